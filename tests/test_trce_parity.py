"""Parity of TRCE stage T with the authors' code (ddgoodgood/TRCE b69ef60), written from its equations.

`run_trce_stage1.py` + `src/cfr_utils.py` (`prepare_k_v`, `closed_form_refinement`), with the sexual config
(`token_weight_scale: [0,1,0,0]`, `preserve_scale: η`, `lamb=0.0`), per projection W (every attn2.to_k / to_v):

    mat1 = Σ_i W e_s,i e_m,iᵀ / n  +  η · (η · Σ_captions Σ_tokens W e eᵀ) / 3e4
    mat2 = Σ_i e_m,i e_m,iᵀ / n    +  η · (η · Σ_captions Σ_tokens e eᵀ) / 3e4
    W'   = mat1 · mat2⁻¹

e_m,i / e_s,i: the first [EoT] state of the i-th malicious / safe prompt (the reference finds it by counting words,
a bug for multi-token words: here, as in trce, by the tokenizer); the cache sums every position of each caption. The
divisor 3e4 is read as the cache's caption count (COCO-30k): a cache of N captions here stands for 3e4 captions of the
same statistics, i.e. it is scaled by 3e4 / N before the reference's division.
"""

import pytest
import torch

from trce.concepts import spec_from_dict
from trce.edit import resolve
from trce.methods.stage_t import StageTConfig, erase, projection_paths
from trce.registry import Context
from trce.tokens import first_eos, tokenize

CAPTIONS = ["a blue square on a white background", "a green triangle", "a striped yellow star on gray",
            "a picture of a purple cross", "a dotted orange diamond on a black background", "an orange circle",
            "two dogs playing in the snow", "a bowl of fruit on a wooden table"]
REF_CAPTIONS = 3e4  # what the reference divides its cache by


def _full_rank(pipe):
    """A learned final-layer-norm bias, as real CLIP has: the random tiny encoder's LayerNorm (bias 0) puts every state
    in one hyperplane, which leaves the reference's λ = 0 system singular."""
    torch.manual_seed(0)
    with torch.no_grad():
        pipe.text_encoder.get_submodule("final_layer_norm").bias.normal_(1.0, 0.5)
    return pipe


def _spec():
    return spec_from_dict({"name": "cats", "erase": {"target": "a dog", "expressions": ["a cat", "a kitten", "a tabby"]},
                           "templates": ["a photo of {}", "a drawing of {} on a black background"],
                           "preserve": {"prompts": CAPTIONS}})


@torch.no_grad()
def _states(pipe, prompts):
    ids = tokenize(pipe.tokenizer, prompts)  # (N, L) padded to the context, as the reference tokenizes
    return ids, pipe.text_encoder(ids).last_hidden_state.double()  # (N, L, D)


@torch.no_grad()
def _reference_weights(pipe, spec, eta):
    pairs = spec.pairs()
    ids_m, h_m = _states(pipe, [p.malicious for p in pairs])
    ids_s, h_s = _states(pipe, [p.safe for p in pairs])
    eos = pipe.tokenizer.eos_token_id
    e_m = h_m[torch.arange(len(pairs)), first_eos(ids_m, eos)]  # (n, D) first [EoT] of each malicious prompt
    e_s = h_s[torch.arange(len(pairs)), first_eos(ids_s, eos)]  # (n, D) ... of its safe prompt
    _, h_c = _states(pipe, CAPTIONS)
    e_c = h_c.reshape(-1, h_c.shape[-1])  # (N·L, D): every token of every caption
    scale = REF_CAPTIONS / len(CAPTIONS)  # the cache as if it held 3e4 such captions
    n = len(pairs)
    out = {}
    for path in projection_paths(pipe):
        w = resolve(pipe, path).detach().double()  # (out, D)
        cache1 = scale * (w @ e_c.T @ e_c)  # Σ W e eᵀ
        cache2 = scale * (e_c.T @ e_c)  # Σ e eᵀ
        mat1 = sum(torch.outer(w @ e_s[i], e_m[i]) for i in range(n)) / n + eta * (eta * cache1) / REF_CAPTIONS
        mat2 = sum(torch.outer(e_m[i], e_m[i]) for i in range(n)) / n + eta * (eta * cache2) / REF_CAPTIONS
        out[path] = mat1 @ torch.inverse(mat2)
    return out


@pytest.mark.parametrize("eta", [0.01, 0.1])
def test_stage_t_equals_the_authors_closed_form(tiny_pipe, tmp_path, eta):
    spec, tiny_pipe = _spec(), _full_rank(tiny_pipe)
    edit = erase(tiny_pipe, spec, StageTConfig(eta=eta, ridge=0.0),
                 Context(cache_dir=str(tmp_path / "cache"), progress=False))
    expected = _reference_weights(tiny_pipe, spec, eta)
    assert set(edit.weights) == set(expected)
    for path, ref in expected.items():
        got = edit.weights[path].double()
        assert float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref)) < 1e-5, path
    length = tiny_pipe.tokenizer.model_max_length
    assert edit.settings["eta"] == eta and edit.settings["preserve_weight"] == pytest.approx(eta ** 2 * length)


def test_the_papers_eta_sweep_is_a_hundredfold_in_preservation_weight(tiny_pipe, tmp_path):
    """Table 3 sweeps η over 0.002-0.02: as the authors apply it (η²), the preservation weight spans 100x."""
    ctx, tiny_pipe = Context(cache_dir=str(tmp_path / "cache"), progress=False), _full_rank(tiny_pipe)
    low, high = (erase(tiny_pipe, _spec(), StageTConfig(eta=e, ridge=0.0), ctx) for e in (0.002, 0.02))
    assert high.settings["preserve_weight"] / low.settings["preserve_weight"] == pytest.approx(100.0)
