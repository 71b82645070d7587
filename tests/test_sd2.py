"""SD 2.x: the family is told apart by its "!" padding, token roles follow the tokenizer, every method runs
erase -> patch -> apply -> eval -> revert on tiny epsilon and v-prediction pipelines, and the methods' targets are
consistent under v-prediction."""

from __future__ import annotations

import pytest
import torch
from every_method import TINY, weights

import trce
from trce.families import family_of
from trce.methods.trajectories import Reference, concept_trajectories
from trce.testing import tiny_pipeline, tiny_pipeline_dir
from trce.tokens import first_eos, pair_positions, tokenize


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def sd2_dir(request, tmp_path_factory):
    return tiny_pipeline_dir(tmp_path_factory.mktemp("sd2") / request.param, family="sd2",
                             prediction_type=request.param)


def test_the_family_is_told_apart_by_its_padding():
    assert family_of(tiny_pipeline()).name == "sd1"
    pipe = tiny_pipeline(family="sd2")
    assert family_of(pipe).name == "sd2" and pipe.tokenizer.pad_token == "!"


def test_token_roles_follow_the_tokenizer_not_eot_padding():
    pipe = tiny_pipeline(family="sd2")
    tok = pipe.tokenizer
    ids = tokenize(tok, ["a red circle", "a circle"])
    eos = first_eos(ids, tok.eos_token_id)
    assert ids[0, eos[0]] == tok.eos_token_id and (ids[0, eos[0] + 1:] == tok.pad_token_id).all()
    assert pair_positions(tok, ids[0], ids[1], ("eot",)) == [(int(eos[0]), int(eos[1]))]
    every = pair_positions(tok, ids[0], ids[1], ("eot-all",))
    assert every[0] == (int(eos[0]), int(eos[1])) and len(every) == ids.shape[1] - int(eos[0])


@pytest.mark.parametrize("method", list(TINY))
def test_every_method_erases_applies_evaluates_and_reverts(method, sd2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    pipe = trce.load_pipeline(str(sd2_dir))
    before = weights(pipe)
    edit = trce.erase(pipe, "shapeworld-red", method=method, progress=False, **TINY[method])
    edit.save(tmp_path / "patch")
    patched = trce.load_pipeline(str(sd2_dir), patch=tmp_path / "patch")
    assert edit.weights and any(not torch.equal(weights(patched)[k], before[k]) for k in edit.weights)
    metrics = trce.evaluate(pipe, "shapeworld-red", edit=trce.load_patch(tmp_path / "patch"), limit=1, steps=2,
                            progress=False)
    assert metrics["n"] == 9 and metrics["method"] == method
    patched.trce_patch.revert(patched)
    assert all(torch.equal(v, before[k]) for k, v in weights(patched).items())
    assert all(torch.equal(v, before[k]) for k, v in weights(pipe).items())  # evaluate left the pipeline as it was


def test_v_prediction_targets_are_the_epsilon_targets_in_the_models_parameterisation(tmp_path):
    """Stage V's Eq. 6-7 targets built from v-predictions are exactly the epsilon-space targets written as v."""
    pipe = tiny_pipeline(family="sd2", prediction_type="v_prediction")
    ref = Reference.from_pipe(pipe)
    beta = 3.0
    data = concept_trajectories(ref, [("a red circle", "a circle")], 1, steps=3, keep=2, guidance=2.0, beta=beta,
                                image_size=None, seed=0, batch_size=1, cache_dir=None, progress=False)
    alphas = pipe.scheduler.alphas_cumprod
    emb = {k: ref.encode([p]) for k, p in (("null", ""), ("m", "a red circle"), ("s", "a circle"))}
    for k in range(2):
        x, t = data.latents[:, k], data.timesteps[k]
        a, b = alphas[t].sqrt(), (1 - alphas[t]).sqrt()
        with torch.no_grad():
            v = {name: ref.eps(x, t, e) for name, e in emb.items()}
        eps = {name: a * value + b * x for name, value in v.items()}  # v -> epsilon at this x_t
        want_eps = eps["null"] + beta * (eps["s"] - eps["null"])
        got_eps = a * data.f_safe[:, k] + b * x
        assert torch.allclose(got_eps, want_eps, atol=1e-5)
