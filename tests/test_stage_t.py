"""Stage T and its [KEY] ablation (`trce-key`): properties of the closed-form edit (Eq. 5) on a tiny random pipeline."""

import re

import pytest
import torch

from trce.concepts import spec_from_dict
from trce.edit import fingerprint, resolve, same_base
from trce.errors import TrceError
from trce.methods import erase as erase_method
from trce.methods.closed_form import apply_transform, solve_low_rank, solve_transform
from trce.methods.prior import preservation_prior
from trce.methods.stage_t import StageTConfig, erase, erase_trce_key, pair_embeddings, projection_paths
from trce.registry import Context, get_method
from trce.tokens import role_positions, tokenize

PRESERVE = ["a blue square on a white background", "a green triangle", "a striped yellow star on gray",
            "a picture of a purple cross", "a dotted orange diamond on a black background", "an orange circle"]


def _spec(name="cats", expressions=("a cat", "a kitten", "a tabby"), target="a dog", preserve=None, **over):
    raw = {"name": name, "erase": {"target": target, "expressions": list(expressions)},
           "templates": ["a photo of {}", "a drawing of {} on a black background"],
           "preserve": {"prompts": preserve} if preserve else "none"}
    raw.update(over)
    return spec_from_dict(raw)


def _config(tmp_path, **over):
    """(stage T settings, the context: a cache of the test's own, no progress bars)."""
    return StageTConfig(**over), Context(cache_dir=str(tmp_path / "cache"), progress=False)


def _state(pipe):
    return {f"{c}.{k}": v.detach().clone() for c in ("unet", "text_encoder", "vae")
            for k, v in getattr(pipe, c).state_dict().items()}


@torch.no_grad()
def _projection_gap(pipe, edit, em, es):
    """max over layers of ||W' e_m - W e_s|| / ||W e_m - W e_s|| (0 = the edit maps exactly)."""
    worst = 0.0
    for path, new in edit.weights.items():
        w = resolve(pipe, path).detach().double()
        gap = torch.linalg.norm(em @ new.double().T - es @ w.T) / torch.linalg.norm((em - es) @ w.T)
        worst = max(worst, float(gap))
    return worst


def test_exact_mapping_when_well_posed(tiny_pipe, tmp_path):
    spec = _spec()
    edit = erase(tiny_pipe, spec, *_config(tmp_path, eta=0.0, ridge=1e-12))
    em, es, _ = pair_embeddings(tiny_pipe, spec.pairs(), "eot", progress=False)
    assert em.shape[0] == 6 < tiny_pipe.text_encoder.config.hidden_size  # fewer pairs than width: well posed
    assert _projection_gap(tiny_pipe, edit, em, es) < 1e-4
    assert edit.info["erase_residual"] < 1e-4


def test_factored_solve_equals_eq5_per_layer(tiny_pipe, tmp_path):
    spec = _spec(preserve=PRESERVE)
    eta, ridge = 0.3, 1e-3
    edit = erase(tiny_pipe, spec, *_config(tmp_path, eta=eta, ridge=ridge))
    em, es, _ = pair_embeddings(tiny_pipe, spec.pairs(), "eot", progress=False)
    prior = preservation_prior(tiny_pipe, PRESERVE, "all", cache=tmp_path / "cache", progress=False)
    n, width = em.shape[0], em.shape[1]
    mm, c = em.T @ em / n, prior.cov
    weight = eta ** 2 * prior.count / prior.prompts  # the paper's η as the authors apply it: η² x tokens per caption
    assert prior.count == len(PRESERVE) * tiny_pipe.tokenizer.model_max_length  # role all: every position
    assert edit.settings["preserve_weight"] == pytest.approx(weight) and edit.settings["eta"] == eta
    lam = ridge * float(torch.trace(mm + weight * c)) / width
    assert edit.settings["lambda"] == pytest.approx(lam)
    for path in projection_paths(tiny_pipe)[:4]:
        w = resolve(tiny_pipe, path).detach().double()
        lhs = w @ es.T @ em / n + weight * w @ c + lam * w  # Σ W e_s e_mᵀ/n + w W C + λW
        rhs = mm + weight * c + lam * torch.eye(width, dtype=torch.float64)
        direct = torch.linalg.solve(rhs.T, lhs.T).T  # lhs · rhs⁻¹
        assert torch.allclose(edit.weights[path].double(), direct, rtol=1e-4, atol=1e-6)


def test_preservation_moves_less_with_eta(tiny_pipe, tmp_path):
    spec = _spec(preserve=PRESERVE)
    ids = tokenize(tiny_pipe.tokenizer, PRESERVE)
    with torch.no_grad():
        ek = tiny_pipe.text_encoder(ids).last_hidden_state.reshape(-1, 32).double()  # all tokens

    def moved(eta):
        edit = erase(tiny_pipe, spec, *_config(tmp_path, eta=eta, ridge=1e-6))
        return sum(float(torch.linalg.norm(ek @ (new.double() - resolve(tiny_pipe, p).detach().double()).T))
                   for p, new in edit.weights.items()), edit

    without, e0 = moved(0.0)
    with_eta, e1 = moved(0.5)
    assert with_eta < 0.5 * without
    assert e1.info["preserve_drift"] < e0.info["preserve_drift"]
    assert e1.info["erase_residual"] > e0.info["erase_residual"]  # the price: a less exact mapping


def test_empty_spec_changes_nothing(tiny_pipe, tmp_path):
    spec = _spec(expressions=(), preserve=PRESERVE)
    assert spec.pairs() == []
    edit = erase(tiny_pipe, spec, *_config(tmp_path))
    before = _state(tiny_pipe)
    edit.apply(tiny_pipe)
    after = _state(tiny_pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_only_cross_attention_kv_change_and_revert_is_exact(tiny_pipe, tmp_path):
    base = fingerprint(tiny_pipe)
    edit = erase(tiny_pipe, _spec(preserve=PRESERVE), *_config(tmp_path))
    assert same_base(edit.base, base) and edit.base["id"] == base["id"]
    assert edit.paths() and all(re.search(r"\.attn2\.to_[kv]\.weight$", p) for p in edit.paths())
    assert len(edit.paths()) == 2 * sum(1 for n, _ in tiny_pipe.unet.named_modules() if n.endswith("attn2"))
    before = _state(tiny_pipe)
    edit.apply(tiny_pipe)
    during = _state(tiny_pipe)
    changed = {k for k in before if not torch.equal(before[k], during[k])}
    assert changed == set(edit.paths())
    edit.revert(tiny_pipe)
    after = _state(tiny_pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_prior_cache_hit_second_time(tiny_pipe, tmp_path, caplog):
    spec = _spec(preserve=PRESERVE)
    first = erase(tiny_pipe, spec, *_config(tmp_path))
    files = list((tmp_path / "cache" / "priors").glob("*.safetensors"))
    assert len(files) == 1 and not first.info["prior_cached"]
    second = erase(tiny_pipe, spec, *_config(tmp_path))
    assert second.info["prior_cached"] and second.info["prior_cache"] == first.info["prior_cache"]
    assert all(torch.equal(first.weights[p], second.weights[p]) for p in first.weights)
    other = erase(tiny_pipe, _spec(preserve=PRESERVE[:3]), *_config(tmp_path))  # another prompt set: a miss
    assert not other.info["prior_cached"]
    role = erase(tiny_pipe, spec, *_config(tmp_path, preserve_role="eot"))  # another role: a miss
    assert not role.info["prior_cached"]
    files[0].write_bytes(files[0].read_bytes()[:50])  # a damaged cache file is recomputed
    third = erase(tiny_pipe, spec, *_config(tmp_path))
    assert not third.info["prior_cached"] and "rebuilding it" in caplog.text
    assert all(torch.equal(first.weights[p], third.weights[p]) for p in first.weights)


def test_prior_roles_count_the_right_tokens(tiny_pipe, tmp_path):
    tok = tiny_pipe.tokenizer
    ids = tokenize(tok, PRESERVE)
    for role, expect in (("all", len(PRESERVE) * tok.model_max_length),
                         ("eot", len(PRESERVE)),
                         ("eot-all", sum(len(role_positions(tok, row, ("eot-all",))) for row in ids))):
        prior = preservation_prior(tiny_pipe, PRESERVE, role, use_cache=False, progress=False)
        assert prior.count == expect
        assert torch.allclose(prior.cov, prior.cov.T)
    with pytest.raises(TrceError, match="unknown token role 'key'"):
        preservation_prior(tiny_pipe, PRESERVE, "key", use_cache=False, progress=False)


def test_multi_concept_is_one_solve_over_all_pairs(tiny_pipe, tmp_path):
    a = _spec("cats")
    b = _spec("birds", expressions=("a parrot", "a crow"), target="a plane")
    edit = erase(tiny_pipe, [a, b], *_config(tmp_path, eta=0.0, ridge=1e-12))
    assert edit.spec["name"] == "cats+birds" and len(edit.spec["concepts"]) == 2
    assert edit.info["pairs"] == len(a.pairs()) + len(b.pairs())
    em, es, _ = pair_embeddings(tiny_pipe, a.pairs() + b.pairs(), "eot", progress=False)
    assert _projection_gap(tiny_pipe, edit, em, es) < 1e-3
    with pytest.raises(TrceError, match=r"disagree on eta .*--eta"):
        erase(tiny_pipe, [a, _spec("other", eta=0.5)], *_config(tmp_path))


def test_the_key_ablation_maps_keyword_tokens(tiny_pipe, tmp_path):
    spec = _spec()
    edit = erase_trce_key(tiny_pipe, spec, *_config(tmp_path, eta=0.0, ridge=1e-12))
    assert edit.method == "trce-key" and edit.settings["token_role"] == "key"
    em, es, _ = pair_embeddings(tiny_pipe, spec.pairs(), "key", progress=False)
    assert edit.info["embeddings"] == em.shape[0] > len(spec.pairs())  # every token of each expression
    assert _projection_gap(tiny_pipe, edit, em, es) < 1e-3
    with pytest.raises(TrceError, match=r"the \[KEY\] ablation \(trce-key\) maps the keyword tokens"):
        erase_trce_key(tiny_pipe, spec, *_config(tmp_path, token_role="eot"))


def test_token_role_combinations_map_each_part(tiny_pipe, tmp_path):
    spec = _spec(expressions=("a cat",))
    edit = erase(tiny_pipe, spec, *_config(tmp_path, eta=0.0, ridge=1e-12, token_role="eot+key"))
    em_e, _, _ = pair_embeddings(tiny_pipe, spec.pairs(), "eot", progress=False)
    em_k, _, _ = pair_embeddings(tiny_pipe, spec.pairs(), "key", progress=False)
    assert edit.info["embeddings"] == em_e.shape[0] + em_k.shape[0]
    all_rows = erase(tiny_pipe, spec, *_config(tmp_path, token_role="eot-all"))
    assert all_rows.info["embeddings"] > 2 * len(spec.pairs())


def test_nan_embeddings_stop_with_a_clear_message(tiny_pipe, tmp_path):
    with torch.no_grad():
        for name, param in tiny_pipe.text_encoder.named_parameters():
            if name.endswith("final_layer_norm.weight"):
                param.fill_(float("nan"))
    with pytest.raises(TrceError, match="NaN"):
        erase(tiny_pipe, _spec(), *_config(tmp_path))


def test_bad_settings_are_refused():
    with pytest.raises(TrceError, match="eta must be a number >= 0"):
        StageTConfig(eta=-0.1)
    with pytest.raises(TrceError, match="did you mean 'eot-all'"):
        StageTConfig(token_role="eot-al")
    with pytest.raises(TrceError, match="unknown token role 'key'"):
        StageTConfig(preserve_role="key")


def test_method_registry_and_stages(tiny_pipe, tmp_path):
    assert get_method("trce").name == "trce"
    with pytest.raises(TrceError, match="unknown method 'ucee' \\(did you mean 'uce'\\?\\)"):
        get_method("ucee")
    trce = get_method("trce")
    assert trce.parse_stages("T") == ("T",)
    assert trce.parse_stages("V,T") == ("T", "V")  # run in the method's order
    with pytest.raises(TrceError, match="has no stage 'X'"):
        trce.parse_stages("T,X")
    edit = erase_method(tiny_pipe, _spec(), "trce-key", cache=tmp_path / "cache", progress=False)
    assert edit.method == "trce-key"
    edit = erase_method(tiny_pipe, _spec(), "trce", "T", cache=tmp_path / "cache", progress=False)
    assert edit.method == "trce" and edit.settings["stage"] == "T"


def test_trce_stages_t_then_v_make_one_edit(tiny_pipe, tmp_path):
    """Stage V runs on the stage-T model with the original model as reference; one Edit, pipe unchanged."""
    base = fingerprint(tiny_pipe)
    before = _state(tiny_pipe)
    v_settings = {"n_trajectories": 1, "n_uncond": 1, "ddim_steps": 2, "epochs": 1, "checkpoint_every": 0}
    edit = erase_method(tiny_pipe, _spec(expressions=("a cat",)), "trce", "T,V", V=v_settings,
                        cache=tmp_path / "cache", progress=False)
    assert edit.method == "trce" and edit.settings["stages"] == ["T", "V"]
    assert edit.base["id"] == base["id"]
    assert any(".attn2.to_k." in p for p in edit.paths()) and any(".attn1." in p for p in edit.paths())
    after = _state(tiny_pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)
    edit.apply(tiny_pipe)  # the base check passes: the patch belongs to the unedited model
    edit.revert(tiny_pipe)


def test_the_low_rank_factors_are_the_transform():
    """T − I = (B − M) M⁻¹ has rank ≤ n: I + u·vt is T, and W + (W u) vt is W·T, with and without columns."""
    gen = torch.Generator().manual_seed(0)
    d, n = 48, 7
    em, es = torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randn(n, d, generator=gen, dtype=torch.float64)
    pk = torch.randn(200, d, generator=gen, dtype=torch.float64)
    cov = pk.T @ pk / 200
    t, _ = solve_transform(em, es, cov, eta=0.1, ridge=1e-4)
    lr = solve_low_rank(em, es, cov, eta=0.1, ridge=1e-4)
    assert lr is not None and lr.u.shape == (d, n) and lr.vt.shape == (n, d)
    assert torch.allclose(torch.eye(d, dtype=torch.float64) + lr.u @ lr.vt, t, atol=1e-10)
    w = torch.randn(30, d, generator=gen)
    assert torch.allclose(apply_transform(w, t, low_rank=lr), apply_transform(w, t), atol=1e-5)
    wide = torch.randn(30, d + 5, generator=gen)
    assert torch.equal(apply_transform(wide, t, (5, d + 5), lr)[:, :5], wide[:, :5])
    assert torch.allclose(apply_transform(wide, t, (5, d + 5), lr), apply_transform(wide, t, (5, d + 5)), atol=1e-5)
    assert solve_low_rank(torch.randn(d, d, dtype=torch.float64), es[:1].repeat(d, 1), cov, 0.1, 1e-4) is None
