"""ESD (the fine-tuning baseline) on the tiny pipeline, and `trce erase --method esd` end to end."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from trce.errors import TrceError
from trce.families import family_of
from trce.methods.esd import ESDConfig, erase_esd
from trce.testing import Killed, assert_one_line_error, die_after_checkpoint

ERASE = ["a red circle", "a crimson disc"]
FAST = {"iterations": 4, "ddim_steps": 4, "lr": 1e-3}


def _unet_state(pipe) -> dict[str, torch.Tensor]:
    return {f"unet.{k}": v.clone() for k, v in pipe.unet.state_dict().items()}


@pytest.mark.parametrize("group", ["cross-attn", "non-cross-attn"])
def test_only_the_selected_group_changes_and_the_pipeline_is_left_as_it_was(tiny_pipe, group):
    before = _unet_state(tiny_pipe)
    edit = erase_esd(tiny_pipe, ERASE, ESDConfig(params=group, **FAST), progress=False)
    expected = {f"unet.{n}" for n in family_of(tiny_pipe).trainable(tiny_pipe.unet, group)}
    assert edit.method == "esd" and set(edit.weights) == expected
    assert any(not torch.equal(edit.weights[k], before[k]) for k in expected)
    assert all(torch.equal(v, before[k]) for k, v in _unet_state(tiny_pipe).items())  # restored bit for bit
    with edit.applied(tiny_pipe):
        after = _unet_state(tiny_pipe)
    assert all(torch.equal(v, before[k]) for k, v in after.items() if k not in expected)


def test_the_target_is_negatively_guided(tiny_pipe):
    # at iteration 1 theta' = theta: the loss is ||eps_e - (eps_n - eta_n (eps_e - eps_n))||^2 = (1 + eta_n)^2 ||eps_e - eps_n||^2
    cfg = ESDConfig(iterations=1, ddim_steps=2, negative_guidance=0.0)
    plain = erase_esd(tiny_pipe, ERASE, cfg, progress=False).info["history"]["loss"][0]
    guided = erase_esd(tiny_pipe, ERASE, dataclasses.replace(cfg, negative_guidance=1.0),
                       progress=False).info["history"]["loss"][0]
    assert plain > 0 and guided == pytest.approx(4 * plain, rel=1e-4)


def test_training_lowers_the_loss(tiny_pipe):
    # one prompt, one cached trajectory, one DDIM step: the same (z_t, t) every iteration
    cfg = ESDConfig(iterations=12, lr=3e-3, latents="cached", ddim_steps=1, cache_trajectories=1)
    losses = erase_esd(tiny_pipe, ERASE[:1], cfg, progress=False).info["history"]["loss"]
    assert losses[-1] < 0.5 * losses[0], losses


def test_checkpoints_resume_to_the_same_result(tiny_pipe, tmp_path, monkeypatch):
    from trce.methods import esd

    cfg = ESDConfig(iterations=6, ddim_steps=3, lr=1e-3)
    ckpt = tmp_path / "ckpt"
    first = erase_esd(tiny_pipe, ERASE, cfg, progress=False)  # uninterrupted
    die_after_checkpoint(monkeypatch, esd)  # as if killed right after the checkpoint of iteration 3
    with pytest.raises(Killed):
        erase_esd(tiny_pipe, ERASE, cfg, progress=False, checkpoint_dir=ckpt, checkpoint_every=3)
    monkeypatch.undo()
    resumed = erase_esd(tiny_pipe, ERASE, cfg, progress=False, checkpoint_dir=ckpt, checkpoint_every=3)
    assert resumed.info["resumed_from"] == 3 and resumed.info["history"] == first.info["history"]
    assert all(torch.equal(resumed.weights[k], v) for k, v in first.weights.items())
    assert not ckpt.exists()  # a finished run removes its checkpoints
    die_after_checkpoint(monkeypatch, esd)
    with pytest.raises(Killed):
        erase_esd(tiny_pipe, ERASE, cfg, progress=False, checkpoint_dir=ckpt, checkpoint_every=3)
    with pytest.raises(TrceError, match="differs in: lr"):
        erase_esd(tiny_pipe, ERASE, dataclasses.replace(cfg, lr=1e-4), progress=False, checkpoint_dir=ckpt)


@pytest.mark.parametrize("values,bad", [
    ({"params": "attn"}, "'attn'"), ({"latents": "fresh"}, "'fresh'"), ({"lr": 0}, "lr must be a positive number"),
    ({"negative_guidance": -1}, "negative_guidance must be a number >= 0, got -1"),
    ({"iterations": 0}, "iterations must be a positive integer, got 0"),
])
def test_bad_config_values_are_named(values, bad):
    with pytest.raises(TrceError, match=bad):
        ESDConfig(**values)


def test_esd_end_to_end(run_cli, tiny_dir, tmp_path):
    patch = tmp_path / "esd"
    code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--method", "esd",
                           "--set", "esd.iterations=2", "--set", "esd.ddim_steps=2", "--set", "esd.params=non-cross-attn",
                           "--out", patch)
    assert code == 0, err
    meta = json.loads((patch / "patch.json").read_text())
    assert meta["method"] == "esd" and meta["settings"]["params"] == "non-cross-attn"
    assert meta["config"]["settings"]["esd"]["iterations"] == 2
    code, _, err = run_cli("generate", "--model", tiny_dir, "--patch", patch, "--prompt", "a red star", "--steps", 2,
                           "--out", tmp_path / "x.png")
    assert code == 0, err
    code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--method", "esd",
                           "--set", "esd.lrr=1", "--out", tmp_path / "bad")
    assert_one_line_error(code, err, "lrr", "did you mean 'lr'")
