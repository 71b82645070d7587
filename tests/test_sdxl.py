"""SDXL: the family packs both encoders and the pooled path; stage T closes both doors the concept enters by; every
method runs erase -> patch -> apply -> eval -> revert on a tiny random StableDiffusionXLPipeline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from every_method import TINY, assert_one_pass_states, weights

import trce
from trce.families import family_of
from trce.methods.stage_t import StageTConfig, erase, pooled_pair_embeddings
from trce.registry import Context
from trce.testing import tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "pipe"
    tiny_sdxl_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


def test_the_family_packs_token_states_pooled_and_size_ids():
    pipe = tiny_sdxl_pipeline()
    fam = family_of(pipe)
    assert fam.name == "sdxl" and fam.text_width(pipe) == 64 and fam.pooled_width(pipe) == 32
    cond = fam.encode(pipe, ["a red circle"])
    embeds, _, pooled, _ = pipe.encode_prompt(["a red circle"], device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(cond[:, :-1], embeds) and torch.equal(cond[:, -1, :32], pooled)
    assert cond[0, -1, 32:38].tolist() == [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]  # 8 latent px x vae scale 4
    null = fam.unconditional(pipe)  # force_zeros_for_empty_prompt: zeros, as the pipeline uses
    assert not null[:, :-1].any() and not null[:, -1, :32].any() and null[0, -1, 32:38].any()
    inputs = {i.name: i for i in fam.text_inputs(pipe)}
    assert inputs["pooled"].paths == ("unet.add_embedding.linear_1.weight",) and inputs["pooled"].columns == (0, 32)
    assert all(".attn2.to_" in p for p in inputs["tokens"].paths)
    assert_one_pass_states(fam, pipe)  # stage T reads token states and pooled vectors from one encoder pass


def test_stage_t_closes_both_doors(tmp_path):
    pipe = tiny_sdxl_pipeline()
    spec = trce.load_concept("shapeworld-red")
    ctx = Context(cache_dir=tmp_path, progress=False)
    edit = erase(pipe, spec, StageTConfig(eta=0.0, ridge=1e-10), ctx)
    w = pipe.unet.add_embedding.linear_1.weight.detach()
    new = edit.weights["unet.add_embedding.linear_1.weight"]
    assert torch.equal(new[:, 32:], w[:, 32:])  # the size-id columns are left alone
    pm, ps = pooled_pair_embeddings(pipe, spec.pairs())
    # Eq. 5 with eta = 0 on the pooled columns: W' = argmin sum ||W' e_m - W e_s||^2, so the residual is orthogonal
    # to the malicious pooled vectors (the normal equations), and it is smaller than the gap it closes
    residual = pm @ new[:, :32].double().T - ps @ w[:, :32].double().T  # (pairs, out)
    gap = (pm - ps) @ w[:, :32].double().T
    assert (pm.T @ residual).norm() < 1e-4 * (pm.T @ (ps @ w[:, :32].double().T)).norm()
    assert residual.norm() < gap.norm()
    assert edit.info["pooled"]["embeddings"] == len(spec.pairs())
    without = erase(pipe, spec, StageTConfig(eta=0.0, ridge=1e-10, pooled=False), ctx)  # the ablation
    assert "unet.add_embedding.linear_1.weight" not in without.weights and "pooled" not in without.info
    # pooled_eta weighs the pooled path's preservation prior alone: the token layers are the same edit, and the
    # pooled layer moves less the more its prior weighs (eta 0 is the unregularised solve above)
    path = "unet.add_embedding.linear_1.weight"
    light = erase(pipe, spec, StageTConfig(eta=0.01, ridge=1e-10), ctx)
    heavy = erase(pipe, spec, StageTConfig(eta=0.01, ridge=1e-10, pooled_eta=10.0), ctx)
    assert all(torch.equal(light.weights[k], heavy.weights[k]) for k in light.weights if k != path)
    # pooled_eta is a weight in trce's unit; without it the pooled path takes the token path's w (η² x tokens/caption)
    assert heavy.info["pooled"]["preserve_weight"] == 10.0
    assert light.info["pooled"]["preserve_weight"] == light.settings["preserve_weight"] > 0
    assert (heavy.weights[path] - w).norm() < (light.weights[path] - w).norm() < (new - w).norm()


@pytest.mark.parametrize("method", list(TINY))
def test_every_method_erases_applies_evaluates_and_reverts(method, sdxl_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    pipe = trce.load_pipeline(str(sdxl_dir))
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    before = weights(pipe)
    edit = trce.erase(pipe, "shapeworld-red", method=method, progress=False, **TINY[method])
    # AdvUnlearn trains both text encoders (the SDXL conditioning reads both); every other method edits the UNet
    assert edit.weights and all(p.startswith("text_encoder" if method == "advunlearn" else "unet.")
                                for p in edit.weights)
    with edit.applied(pipe):
        assert any(not torch.equal(weights(pipe)[k], before[k]) for k in edit.weights)
    edit.save(tmp_path / "patch")
    metrics = trce.evaluate(pipe, "shapeworld-red", edit=trce.load_patch(tmp_path / "patch"), limit=1, steps=2,
                            progress=False)
    assert metrics["n"] == 9 and metrics["method"] == method
    if method == "kpop":
        from trce.prompt_injection import hidden_prompt_installed

        with hidden_prompt_installed(pipe, edit, apply=True):  # the hidden prompt fits the 2048-wide (here 64) text
            assert trce.generate_images(pipe, "a red star", 0, steps=2, progress=False).shape == (1, 32, 32, 3)
    assert all(torch.equal(v, before[k]) for k, v in weights(pipe).items())


BUDGETS = {"ring-a-bell": {"generations": 2, "population": 4, "elite": 2}, "mma-text": {"steps": 1, "candidates": 4},
           "unlearndiff": {"steps": 1, "samples": 2, "blocks": 1}, "soft-prompt": {"steps": 1, "samples": 2}}


@pytest.mark.parametrize("attack", list(BUDGETS))
def test_every_attack_runs_through_both_text_encoders(attack, sdxl_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    pipe = trce.load_pipeline(str(sdxl_dir))
    edit = trce.erase(pipe, "shapeworld-red", stages="T", progress=False)
    result = trce.attack(pipe, "shapeworld-red", attack, edit=edit, budget=BUDGETS[attack], limit=1, steps=2,
                         out=tmp_path / "atk", progress=False)
    assert result["n"] == 1 and result["attack"]["asr_after"] is not None
    target = result.results[0]
    if attack == "soft-prompt":  # embeddings of both encoders: the conditioning the SDXL UNet reads, packed
        assert target.embeds["prompt_embeds"].shape == (33, 64) and target.embeds["token_embeds"].shape[1] == 64
    else:
        assert target.prompt and target.tokens


def test_a_specs_sdxl_settings_reach_the_erasure_from_python_and_the_cli(sdxl_dir, tmp_path, run_cli, monkeypatch):
    """`family_settings: {sdxl: ...}` in a spec applies on an SDXL pipeline, through `trce.erase` and `trce erase`."""
    import json

    import yaml

    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    spec = yaml.safe_load(Path(trce.load_concept("shapeworld-red").source).read_text())
    spec["family_settings"] = {"sdxl": {"T": {"eta": 0.75}}, "sd1": {"T": {"eta": 0.25}}}
    path = tmp_path / "red.yaml"
    path.write_text(yaml.safe_dump(spec))
    pipe = trce.load_pipeline(str(sdxl_dir))
    edit = trce.erase(pipe, str(path), stages="T", progress=False)
    assert edit.settings["eta"] == 0.75
    code, _, err = run_cli("erase", "--model", sdxl_dir, "--concept", path, "--stages", "T", "--out", tmp_path / "p")
    assert code == 0, err
    record = json.loads((tmp_path / "p" / "patch.json").read_text())
    assert record["config"]["settings"]["T"]["eta"] == 0.75 and record["config"]["family"] == "sdxl"


def test_pooled_states_cut_after_the_end_of_text_equal_the_full_encoding():
    """The pooled path's vectors are computed on the prompt up to its end-of-text only (causal attention): they
    must equal what the pipeline's own encode_prompt gives on the padded 77 positions."""
    pipe = tiny_sdxl_pipeline()
    prompts = ["a red star", "a big blue circle with stripes on a grey background", ""]
    _, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert torch.allclose(family_of(pipe).pooled_states(pipe, prompts), pooled, atol=1e-6)
