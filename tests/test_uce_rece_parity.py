"""UCE and RECE compute what their authors' code computes (issue 35).

The reference formulas are written out here again, independently of `trce.methods.uce`, from the authors' code:
rohitgandikota/unified-concept-editing @ 35e91e2 `train-scripts/train_erase.py` (`edit_model` :172-315, defaults
:324-442) and CharlesGong12/RECE @ 403a67f `train.py` :228-260, `erase_methods/uce.py` (`edit_model_adversarial`),
`utils/embedding_calculation/close_form_emb.py` :187-209 and `scripts/nudity.sh`. Matrices are built from the text
encoder's outputs and the layers' weights exactly as there (mat1 / mat2 per layer, the attention mask's token count,
the collection of cross-attention layers by block), in float64.
"""

from __future__ import annotations

import pytest
import torch

import trce
from trce.concepts import spec_from_dict
from trce.edit import load_patch
from trce.registry import display_name

SPEC = {"name": "redness", "erase": {"target": "blue", "expressions": ["red", "crimson"]},
        "templates": ["a {} circle", "a small {} star on a white background"],
        "preserve": {"prompts": ["a green square", "a striped yellow triangle"]}}


def _spec():
    return spec_from_dict(SPEC)


def _texts(spec, prompts="expressions"):
    """(old, new) texts as the reference gets them: the bare concept words (--concepts) and their targets, '' -> ' '."""
    if prompts == "pairs":
        return [(p.malicious, p.safe) for p in spec.pairs()]
    return [(e.text, e.target_for(None) or " ") for e in spec.expressions]


# --------------------------------------------------------------------------- the reference, written out
def _layers(pipe):
    """train_erase.py:175-194: every cross-attention of the up/down/mid blocks, to_v of all, then to_k of all."""
    attns = []
    for name, net in pipe.unet.named_children():
        if "up" in name or "down" in name:
            for block in net:
                if "Cross" in type(block).__name__:
                    attns += [tb.attn2 for attn in block.attentions for tb in attn.transformer_blocks]
        if "mid" in name:
            attns += [tb.attn2 for attn in net.attentions for tb in attn.transformer_blocks]
    names = {id(m): n for n, m in pipe.unet.named_modules()}
    layers = [layer.to_v for layer in attns] + [layer.to_k for layer in attns]
    return [(f"unet.{names[id(m)]}.weight", m.weight.detach().double()) for m in layers]


@torch.no_grad()
def _encode(pipe, texts):
    """The tokenizer call of train_erase.py:243-250 (max_length padding, truncation) and the text encoder's [0]."""
    tok = pipe.tokenizer
    ti = tok(list(texts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    return ti, pipe.text_encoder(ti.input_ids)[0].double()


def _reference_uce(pipe, olds, news, retain, lamb=0.5, erase_scale=1.0, preserve_scale=None):
    """train_erase.py `edit_model` with technique 'replace': {path: W'}."""
    if preserve_scale is None:
        preserve_scale = max(0.1, 1 / len(retain))  # :427-428
    news = [" " if n == "" else n for n in news]  # :214-217
    erase_rows = []
    for old, new in zip(olds, news):
        ti, emb = _encode(pipe, [old, new])
        k_old = int(ti.attention_mask[0].sum()) - 2  # :253
        k_new = int(ti.attention_mask[1].sum()) - 2  # :254
        far = max(k_old, k_new)
        o = emb[0][k_old:len(emb[0]) - max(0, far - k_old)]  # :257-258
        n = emb[1][k_new:len(emb[1]) - max(0, far - k_new)]  # :259-260
        erase_rows.append((o, n))
    retain_rows = [_encode(pipe, [r, r])[1][0] for r in retain]  # :289-298, every position
    out = {}
    for path, w in _layers(pipe):
        mat1 = lamb * w  # :234
        mat2 = lamb * torch.eye(w.shape[1], dtype=torch.float64)  # :237
        for o, n in erase_rows:
            values = n @ w.T  # layer(new_emb), 'replace' :277-278
            mat1 += erase_scale * (values.T @ o)  # Σ v cᵀ :284, :286
            mat2 += erase_scale * (o.T @ o)  # Σ c cᵀ :285, :287
        for e in retain_rows:
            mat1 += preserve_scale * ((e @ w.T).T @ e)  # :303-309
            mat2 += preserve_scale * (e.T @ e)  # :310
        out[path] = mat1 @ torch.inverse(mat2)  # :312
    return out


def _reference_rece(pipe, olds, news, uce, epochs=3, reg=0.1, lamb=0.1, erase_scale=1.0, preserve_scale=0.1):
    """RECE train.py :228-260 from the UCE weights `uce`: the closed_form_emb_regzero adversaries, then
    edit_model_adversarial on the current weights, `epochs` times."""
    original = dict(_layers(pipe))
    current = dict(uce)
    concept = [_encode(pipe, [c])[1][0] for c in olds]  # (L, D) each, every position (close_form_emb.py:188-196)
    target = [_encode(pipe, [n])[1][0] for n in news]  # new_embedding[0] (train.py:242-247)
    retain = [" " for _ in olds]  # train.py:155
    width = concept[0].shape[1]
    for _ in range(epochs):
        mat1 = torch.eye(width, dtype=torch.float64) * reg  # close_form_emb.py:202
        mat2 = torch.zeros(width, width, dtype=torch.float64)
        for path, w in current.items():  # :205-207
            mat1 = mat1 + w.T @ w
            mat2 = mat2 + w.T @ original[path]
        coefficient = torch.inverse(mat1) @ mat2  # :208
        adv = [c @ coefficient.T for c in concept]  # :209
        retain_rows = [_encode(pipe, [r, r])[1][0] for r in retain]
        nxt = {}
        for path, w in current.items():  # edit_model_adversarial (erase_methods/uce.py:47-109)
            m1 = lamb * w
            m2 = lamb * torch.eye(width, dtype=torch.float64)
            for a, n in zip(adv, target):
                m1 += erase_scale * ((n @ w.T).T @ a)
                m2 += erase_scale * (a.T @ a)
            for e in retain_rows:
                m1 += preserve_scale * ((e @ w.T).T @ e)
                m2 += preserve_scale * (e.T @ e)
            nxt[path] = m1 @ torch.inverse(m2)
        current = nxt
    return current


def _assert_close(edit, reference):
    assert set(edit.weights) == set(reference)
    for path, ref in reference.items():
        got = edit.weights[path].double()
        rel = float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref))
        assert rel <= 1e-5, (path, rel)


# --------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("settings", [{}, {"preserve": "spec", "target": "uncond"}, {"prompts": "pairs"}])
def test_uce_equals_the_reference_edit_model(tiny_pipe, settings):
    spec = _spec()
    edit = trce.erase(tiny_pipe, spec, method="uce", progress=False, uce=settings)
    texts = _texts(spec, settings.get("prompts", "expressions"))
    olds = [o for o, _ in texts]
    news = [" " for _ in olds] if settings.get("target") == "uncond" else [n for _, n in texts]
    retain = [""] + (list(SPEC["preserve"]["prompts"]) if settings.get("preserve") == "spec" else [])
    _assert_close(edit, _reference_uce(tiny_pipe, olds, news, retain))
    assert edit.method == "uce" and edit.settings["lamb"] == 0.5 and edit.settings["erase_scale"] == 1.0
    assert edit.settings["preserve_scale"] == pytest.approx(max(0.1, 1 / len(retain)))
    assert all(p.endswith(("to_k.weight", "to_v.weight")) for p in edit.weights)


def test_uce_without_keys_edits_the_values_only(tiny_pipe):
    edit = trce.erase(tiny_pipe, _spec(), method="uce", progress=False, uce={"with_to_k": False})
    reference = {p: w for p, w in _reference_uce(tiny_pipe, *zip(*_texts(_spec())), [""]).items()
                 if p.endswith("to_v.weight")}
    _assert_close(edit, reference)


def test_rece_adversaries_and_re_solves_equal_the_reference(tiny_pipe):
    spec = _spec()
    edit = trce.erase(tiny_pipe, spec, method="rece", progress=False, rece={"target": "uncond"})
    olds = [o for o, _ in _texts(spec)]
    news = [" " for _ in olds]
    uce = _reference_uce(tiny_pipe, olds, news, [""])
    _assert_close(edit, _reference_rece(tiny_pipe, olds, news, uce))
    assert edit.settings["robust"] == 3 and edit.settings["reg"] == 0.1 and edit.settings["rece_lamb"] == 0.1
    assert len(edit.info["robust"]["rounds"]) == 3
    one = trce.erase(tiny_pipe, spec, method="rece", progress=False, robust=1)  # the rounds, and the spec's targets
    _assert_close(one, _reference_rece(tiny_pipe, olds, [n for _, n in _texts(spec)],
                                       _reference_uce(tiny_pipe, *zip(*_texts(spec)), [""]), epochs=1))


def test_the_key_ablation_is_trce_stage_t_at_the_keyword_tokens(tiny_pipe, tmp_path):
    """`trce-key` is what `uce` was before issue 35: TRCE's stage T with token role `key`, bit for bit."""
    key = trce.erase(tiny_pipe, "shapeworld-red", method="trce-key", cache=tmp_path, progress=False)
    trce_t = trce.erase(tiny_pipe, "shapeworld-red", method="trce", stages="T", T={"token_role": "key"},
                        cache=tmp_path, progress=False)
    assert key.method == "trce-key" and key.settings["token_role"] == "key"
    assert set(key.weights) == set(trce_t.weights)
    assert all(torch.equal(key.weights[p], trce_t.weights[p]) for p in key.weights)
    assert display_name("trce-key") == "TRCE [KEY] (Table 4 ablation)" and display_name("uce") == "UCE"


@pytest.mark.parametrize("method", ["uce", "rece"])
def test_the_cli_erases_as_the_library_does(method, tiny_dir, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--method", method,
                           "--out", tmp_path / method)
    assert code == 0, err
    cli = load_patch(tmp_path / method)
    edit = trce.erase(trce.load_pipeline(str(tiny_dir)), "shapeworld-red", method=method, progress=False)
    assert cli.method == method and set(cli.weights) == set(edit.weights)
    assert all(torch.equal(cli.weights[p], edit.weights[p]) for p in edit.weights)
    assert cli.settings == edit.settings
