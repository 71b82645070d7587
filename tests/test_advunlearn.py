"""AdvUnlearn (the adversarial-training baseline) on the tiny pipelines: it trains the text encoder (or, as an option,
the UNet's cross-attention) and nothing else, its inner attack brings the concept back on the current model better
than the plain prompt does, the patch applies, evaluates, is attacked and reverts bit for bit from Python and the CLI,
a killed run resumes to the same result, and bad settings are named."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import trce
from trce.edit import applied_edits
from trce.errors import TrceError
from trce.families import family_of
from trce.methods.advunlearn import AdvUnlearnConfig, erase_advunlearn, text_candidates
from trce.testing import Killed, assert_one_line_error, die_after_checkpoint

ERASE = ["a red circle", "a crimson disc"]
KEEP = ["a blue star", "a green square", "a yellow triangle"]
# 3 iterations, the first one plain (warmup), 2 attack steps each after it
FAST = {"iterations": 3, "warmup": 1, "attack_steps": 2, "attack_lr": 1e-2, "lr": 1e-3, "ddim_steps": 2,
        "batch_size": 2, "preserve_batch": 2}
# the spec's settings on the tiny pipeline: few iterations, latents denoised now (no trajectory cache of every prompt)
TINY = {"iterations": 2, "warmup": 0, "attack_steps": 1, "ddim_steps": 2, "latents": "current", "batch_size": 2,
        "preserve_batch": 2}


def _state(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.clone() for name in ("unet", "text_encoder")
            for k, v in getattr(pipe, name).state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_text_encoder_trains_and_nothing_else(tiny_pipe):
    before = _state(tiny_pipe)
    edit = erase_advunlearn(tiny_pipe, ERASE, AdvUnlearnConfig(**FAST), preserve_prompts=KEEP, progress=False)
    expected = {f"text_encoder.{n}" for n in text_candidates(tiny_pipe)["text_encoder"]}
    assert edit.method == "advunlearn" and set(edit.weights) == expected
    assert not any("embedding" in p for p in expected) and any(".layers.0." in p for p in expected)
    assert sum(not torch.equal(v, before[k]) for k, v in edit.weights.items()) > len(expected) // 2
    assert _same(_state(tiny_pipe), before)  # the pipeline is left as it was, bit for bit
    with edit.applied(tiny_pipe):
        now = _state(tiny_pipe)
        assert all(torch.equal(now[k], v) for k, v in edit.weights.items())
        assert all(torch.equal(now[k], v) for k, v in before.items() if k not in expected)  # the UNet untouched
    assert _same(_state(tiny_pipe), before)
    info = edit.info
    assert info["attacked_iterations"] == 2 and len(info["history"]["loss"]) == 3
    assert info["history"]["retain"][0] == 0.0 < info["history"]["retain"][-1]  # the utility term is on
    assert edit.settings["trainable"]["components"] == ["text_encoder"]


def test_module_unet_trains_the_cross_attention_only(tiny_pipe):
    before = _state(tiny_pipe)
    cfg = AdvUnlearnConfig(**{**FAST, "module": "unet"})
    edit = erase_advunlearn(tiny_pipe, ERASE, cfg, preserve_prompts=KEEP, progress=False)
    expected = {f"unet.{n}" for n in family_of(tiny_pipe).trainable(tiny_pipe.unet, "cross-attn")}
    assert set(edit.weights) == expected and all(".attn2." in p for p in expected)
    assert any(not torch.equal(v, before[k]) for k, v in edit.weights.items())
    assert _same(_state(tiny_pipe), before)
    assert edit.settings["trainable"]["group"] == "cross-attn"


def test_the_inner_attack_brings_the_concept_back_on_the_current_model(tiny_pipe):
    """After 4 plain iterations have erased a little, each attacked iteration's prefix delta* lowers the attack
    objective l_atk = ||eps_phi(z_t, [delta; c_e]) - eps_theta(z_t, c_e)||^2 below where it started AND below the
    plain prompt's on the same batch: with delta* the current model draws the concept as the original did, so the
    erasure loss ESD trains on is higher there (what the outer step then lowers)."""
    # a 5-token prefix (UnlearnDiffAtk's; the released script's default is 1) gives the attack room on this tiny model
    cfg = AdvUnlearnConfig(iterations=8, warmup=4, attack_steps=3, attack_lr=1e-2, attack_latents="batch", lr=3e-3,
                           latents="cached", cache_trajectories=1, ddim_steps=4, batch_size=2, preserve_weight=0,
                           attack_tokens=5)
    edit = erase_advunlearn(tiny_pipe, ERASE, cfg, progress=False)
    h = edit.info["history"]
    assert len(h["attack"]) == 4 and len(h["loss"]) == 8
    assert all(a < 0.8 * s for a, s in zip(h["attack"], h["attack_start"])), h
    assert all(a < 0.8 * p for a, p in zip(h["attack"], h["plain"])), h
    assert edit.info["adversary_beats_plain"] == 1.0


def test_a_killed_run_resumes_to_the_same_result(tiny_pipe, tmp_path, monkeypatch):
    from trce.methods import advunlearn

    # warm-started adversary: the prefix of iteration 3 is in the checkpoint and seeds iteration 4's attack
    cfg = AdvUnlearnConfig(**{**FAST, "iterations": 5, "attack_init": "latest"})
    ckpt = tmp_path / "ckpt"
    first = erase_advunlearn(tiny_pipe, ERASE, cfg, preserve_prompts=KEEP, progress=False)
    die_after_checkpoint(monkeypatch, advunlearn)
    with pytest.raises(Killed):
        erase_advunlearn(tiny_pipe, ERASE, cfg, preserve_prompts=KEEP, progress=False, checkpoint_dir=ckpt,
                         checkpoint_every=3)
    monkeypatch.undo()
    resumed = erase_advunlearn(tiny_pipe, ERASE, cfg, preserve_prompts=KEEP, progress=False, checkpoint_dir=ckpt,
                               checkpoint_every=3)
    assert resumed.info["resumed_from"] == 3 and resumed.info["history"] == first.info["history"]
    assert all(torch.equal(resumed.weights[k], v) for k, v in first.weights.items())
    assert not ckpt.exists()
    die_after_checkpoint(monkeypatch, advunlearn)
    with pytest.raises(Killed):
        erase_advunlearn(tiny_pipe, ERASE, cfg, preserve_prompts=KEEP, progress=False, checkpoint_dir=ckpt,
                         checkpoint_every=3)
    with pytest.raises(TrceError, match="differs in: attack_lr"):
        erase_advunlearn(tiny_pipe, ERASE, dataclasses.replace(cfg, attack_lr=1e-3), preserve_prompts=KEEP,
                         progress=False, checkpoint_dir=ckpt)


@pytest.mark.parametrize("values,bad", [
    ({"module": "text"}, r"unknown AdvUnlearn module 'text'"),
    ({"unet_params": "attn"}, "'attn'"),
    ({"attack_init": "last"}, r"unknown AdvUnlearn attack_init 'last' \(did you mean 'latest'\?\)"),
    ({"attack_latents": "new"}, "'new'"),
    ({"lr": 0}, "AdvUnlearn lr must be a positive number, got 0"),
    ({"attack_lr": -1e-3}, "attack_lr must be a positive number, got -0.001"),
    ({"attack_steps": -1}, "attack_steps must be an integer >= 0, got -1"),
    ({"attack_tokens": 0}, "attack_tokens must be a positive integer, got 0"),
    ({"warmup": 1.5}, "warmup must be an integer >= 0, got 1.5"),
    ({"preserve_weight": -0.3}, "preserve_weight must be a number >= 0, got -0.3"),
    ({"negative_guidance": float("nan")}, "negative_guidance must be a number >= 0, got nan"),
    ({"neutral_prompt": 3}, "neutral_prompt must be a string, got 3"),
])
def test_bad_settings_are_named(values, bad):
    with pytest.raises(TrceError, match=bad):
        AdvUnlearnConfig(**values)


def test_bad_inputs_are_named(tiny_pipe):
    with pytest.raises(TrceError, match="preserve_weight=0.3 needs preservation prompts"):
        erase_advunlearn(tiny_pipe, ERASE, AdvUnlearnConfig(**FAST), progress=False)
    with pytest.raises(TrceError, match="40 adversarial tokens do not fit"):
        erase_advunlearn(tiny_pipe, ERASE, AdvUnlearnConfig(**{**FAST, "attack_tokens": 40}), preserve_prompts=KEEP,
                         progress=False)
    with pytest.raises(TrceError, match="non-empty list"):
        erase_advunlearn(tiny_pipe, "a red circle", AdvUnlearnConfig(**FAST), progress=False)


def test_sdxl_trains_what_both_text_encoders_pass_on():
    """SDXL conditions on both encoders' penultimate states and the second's pooled embedding: the first encoder's
    last layer and final norm are not read, so they are not trained; the second's all are."""
    from trce.testing import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    cfg = AdvUnlearnConfig(iterations=2, warmup=0, attack_steps=1, ddim_steps=2, batch_size=1, preserve_weight=0)
    edit = erase_advunlearn(pipe, ERASE, cfg, progress=False)
    cands = text_candidates(pipe)
    first = {f"text_encoder.{n}" for n in cands["text_encoder"] if ".layers.1." not in n
             and "final_layer_norm" not in n}
    second = {f"text_encoder_2.{n}" for n in cands["text_encoder_2"]}
    assert set(edit.weights) == first | second and any("text_projection" in p for p in second)
    assert edit.settings["trainable"]["components"] == ["text_encoder", "text_encoder_2"]
    before = edit.weights["text_encoder_2.text_projection.weight"]
    with edit.applied(pipe):
        assert torch.equal(pipe.text_encoder_2.text_projection.weight, before)
    assert not applied_edits(pipe)


@pytest.mark.parametrize("family,module,components", [
    ("sd3", "text-encoder", ["text_encoder", "text_encoder_2"]),  # both CLIP encoders (no T5 loaded)
    ("flux", "text-encoder", ["text_encoder_2"]),  # T5: the CLIP-L pooled vector is encoded without gradients
    ("flux", "unet", ["transformer"]),  # the denoiser's cross-attention group, a transformer here
])
def test_the_dit_families_train_the_encoders_their_conditioning_reads(family, module, components):
    from trce import testing

    pipe = getattr(testing, f"tiny_{family}_pipeline")()
    cfg = AdvUnlearnConfig(iterations=2, warmup=0, attack_steps=1, ddim_steps=2, preserve_batch=1, module=module)
    edit = erase_advunlearn(pipe, ERASE[:1], cfg, preserve_prompts=KEEP[:1], progress=False)
    assert edit.settings["trainable"]["components"] == components
    assert sorted({p.split(".", 1)[0] for p in edit.weights}) == components
    with edit.applied(pipe):
        pass
    assert not applied_edits(pipe)


def test_python_erase_apply_evaluate_revert(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    pipe = trce.load_pipeline(str(tiny_dir))
    before = _state(pipe)
    edit = trce.erase(pipe, "shapeworld-red", method="advunlearn", progress=False, advunlearn=TINY)
    assert edit.method == "advunlearn" and all(p.startswith("text_encoder.") for p in edit.weights)
    assert edit.settings["iterations"] == 2 and edit.settings["lr"] == 1e-4  # the spec's lr, the caller's rest
    metrics = trce.evaluate(pipe, "shapeworld-red", edit=edit, limit=2, steps=2, progress=False)
    assert metrics["method"] == "advunlearn" and metrics["n"] > 0
    assert not applied_edits(pipe) and _same(_state(pipe), before)  # evaluated on the edit, then reverted
    edit.apply(pipe)
    assert not _same(_state(pipe), before)
    edit.revert(pipe)
    assert _same(_state(pipe), before)
    with pytest.raises(TrceError, match=r"unknown advunlearn setting 'attack_step' \(did you mean 'attack_steps'\?\)"):
        trce.erase(pipe, "shapeworld-red", method="advunlearn", advunlearn={"attack_step": 1})


def test_cli_erase_eval_attack(run_cli, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    code, out, _ = run_cli("methods")
    assert code == 0 and "advunlearn" in out and "AdvUnlearn" in out and "attack_steps=30" in out
    patch = tmp_path / "adv"
    sets = [a for k, v in TINY.items() for a in ("--set", f"advunlearn.{k}={v}")]
    code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--method", "advunlearn",
                           *sets, "--out", patch)
    assert code == 0, err
    meta = json.loads((patch / "patch.json").read_text())
    assert meta["method"] == "advunlearn" and meta["settings"]["module"] == "text-encoder"
    assert meta["config"]["settings"]["advunlearn"]["attack_steps"] == 1
    assert meta["tensors"] and all(p.startswith("text_encoder.") for p in meta["tensors"])
    code, _, err = run_cli("eval", "--model", tiny_dir, "--patch", patch, "--suite", "shapeworld-red", "--limit", 2,
                           "--steps", 2, "--no-progress", "--out", tmp_path / "eval")
    assert code == 0, err
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["method"] == "advunlearn"
    code, _, err = run_cli("attack", "--model", tiny_dir, "--patch", patch, "--suite", "shapeworld-red",
                           "--attack", "soft-prompt", "--limit", 1, "--steps", 1, "--no-progress", "--budget",
                           "tokens=2", "steps=2", "samples=1", "reference_steps=1", "--out", tmp_path / "attack")
    assert code == 0, err
    code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--method", "advunlearn",
                           "--set", "advunlearn.module=unett", "--out", tmp_path / "bad")
    assert_one_line_error(code, err, "unknown AdvUnlearn module 'unett'", "did you mean 'unet'")
    assert not (tmp_path / "bad").exists()
