"""Hardened stage V (`robust=R`): rounds of soft-prompt adversaries found against the current model join Eq. 8 at
their pair's cached points. robust=0 is the plain stage bit for bit; the adversaries are found against the pipeline
with the stage-V weights trained so far; they enter the loss (the trained model's prediction under an adversary
moves toward f_safe the more, the more samples take it); a killed run resumes to the same weights; bad settings are
named; `trce.erase(robust=R)`, `--robust R` and `--set V.robust=R` harden stage V."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import trce
from trce.errors import TrceError
from trce.families import family_of
from trce.methods import plan, robust
from trce.methods.stage_v import StageVConfig, erase_v, original_pipeline, round_steps
from trce.methods.training import encode_prompts
from trce.methods.trajectories import Reference, concept_trajectories
from trce.testing import assert_one_line_error
from trce.utils import io

PAIRS = [("a red circle", "a blue circle"), ("a red square", "a blue square"), ("a red star", "a green star")]
TINY = StageVConfig(n_trajectories=4, n_uncond=8, ddim_steps=6, epochs=1, preserve_batch=2, cache_batch_size=4,
                    checkpoint_every=0, lr=1e-3)
HARD = replace(TINY, robust=1, robust_prompts=2, robust_tokens=2, robust_steps=2, robust_samples=2,
               robust_reference_steps=2)
V_TINY = {"n_trajectories": 2, "n_uncond": 4, "ddim_steps": 4, "epochs": 1, "preserve_batch": 1,
          "cache_batch_size": 2, "robust_prompts": 1, "robust_tokens": 2, "robust_steps": 1, "robust_samples": 1,
          "robust_reference_steps": 2}


@pytest.fixture(scope="module")
def pipe():
    from trce.testing import tiny_pipeline

    return tiny_pipeline(0)


def _same_weights(a, b, atol: float = 0.0) -> bool:
    return set(a.weights) == set(b.weights) and all(
        torch.allclose(a.weights[k], b.weights[k], rtol=0, atol=atol) for k in a.weights)


def _rounds(edit) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in edit.info["robust"]["rounds"]]


# --------------------------------------------------------------------------- settings
@pytest.mark.parametrize(("field", "value", "needle"), [
    ("robust", -1, "robust must be an integer >= 0, got -1"),
    ("robust", 1.5, "robust must be an integer >= 0"),
    ("robust_mix", 1.5, "robust_mix must be a number in \\[0, 1\\], got 1.5"),
    ("robust_prompts", 0, "robust_prompts must be a positive integer, got 0"),
    ("robust_lr", 0.0, "robust_lr must be a positive number"),
    ("robust_consistency", -1.0, "robust_consistency must be a number >= 0, got -1.0"),
    ("robust_consistency", 1.0, "robust_consistency=1.0 needs hardening \\(robust > 0\\)"),
])
def test_bad_settings_are_named(field, value, needle):
    with pytest.raises(TrceError, match=needle):
        StageVConfig(**{field: value})


def test_rounds_are_evenly_spaced_with_round_zero_before_training():
    assert round_steps(1, 12) == [0]
    assert round_steps(3, 12) == [0, 4, 8]
    assert round_steps(3, 2) == [0, 0, 1]  # more rounds than steps: some run back to back


# --------------------------------------------------------------------------- robust=0 and the mix
def test_robust_zero_is_the_plain_stage_and_no_mix_trains_the_same(pipe, tmp_path):
    keyed = {"epochs": 2, "checkpoint_every": 100}  # a run key (no checkpoint is due in 8 steps)
    plain = erase_v(pipe, PAIRS, replace(TINY, **keyed), cache_dir=tmp_path, progress=False)
    # the hardening settings of an unhardened run change neither its run key nor its record
    other = erase_v(pipe, PAIRS, replace(TINY, **keyed, robust_steps=7, robust_mix=0.9), cache_dir=tmp_path,
                    progress=False)
    assert other.info["run_key"] == plain.info["run_key"] and other.settings == plain.settings
    assert not any(k.startswith("robust") for k in plain.settings) and "robust" not in plain.info
    assert _same_weights(plain, other)
    # adversaries found but never mixed in (robust_mix=0): the very same batches, so the very same weights
    found = erase_v(pipe, PAIRS, replace(HARD, **keyed, robust_mix=0.0), cache_dir=tmp_path, progress=False)
    assert _same_weights(plain, found)
    (record,) = found.info["robust"]["rounds"]
    assert record["adversaries"] == 2 and record["trained"]["adversarial_share"] == 0.0
    assert found.settings["robust"] == 1 and found.info["run_key"] != plain.info["run_key"]


def test_adversaries_are_found_against_the_current_model(pipe, tmp_path, monkeypatch):
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    attacked = []
    real = robust.soft_attack

    def spy(pipe_, edit, prompts, picked, **kw):
        attacked.append(({k: v.detach().cpu().clone() for k, v in edit.weights.items()}, list(picked)))
        return real(pipe_, edit, prompts, picked, **kw)

    monkeypatch.setattr(robust, "soft_attack", spy)
    edit = erase_v(pipe, PAIRS, replace(HARD, robust=2, robust_mix=1.0, robust_prompts=3), cache_dir=tmp_path,
                   progress=False)
    rounds = edit.info["robust"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and [r["step"] for r in rounds] == [0, 2]  # 4 steps
    assert edit.info["robust"]["adversaries"] == 6  # 4 trajectories cover the 3 pairs: all three each round
    for r, (weights, picked) in zip(rounds, attacked, strict=True):
        assert r["pairs"] == picked == [0, 1, 2]
        assert r["objective"] <= r["objective_start"]  # the best prefix seen, the start included
        assert r["erase_adversarial"] >= 0 and r["erase_plain"] >= 0 and r["seconds"] > 0
        assert r["trained"]["adversarial_share"] == 1.0 and r["trained"]["samples"] == 2  # robust_mix=1
    # round 1 attacks the starting weights, round 2 the weights after two optimizer steps
    assert all(torch.equal(v, before[k.removeprefix("unet.")]) for k, v in attacked[0][0].items())
    assert any(not torch.equal(v, attacked[0][0][k]) for k, v in attacked[1][0].items())
    assert edit.info["robust"]["final"]["erase_adversarial"] >= 0
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in before.items())  # the pipeline as it was
    json.dumps(edit.info)  # the patch records it as JSON


def test_adversarial_conditionings_enter_the_loss(pipe, tmp_path, monkeypatch):
    """An adversary the model reads very differently from c^m (a far conditioning stands in for the attack's):
    every training sample of a pair with an adversary reads it at robust_mix=1, and the trained model's Eq. 8 gap
    ||ε̂ − f_safe||² − ||ε̂ − f_unsafe||² under it, over every cached point, falls the more, the more samples take it."""
    far = 4 * encode_prompts(pipe, ["a yellow triangle on a purple background"])[0]  # (L, D)

    def fake(pipe_, edit, prompts, picked, **kw):
        return [SimpleNamespace(embeds={"prompt_embeds": far.clone()}, objective=0.5, objective_start=1.0,
                                objective_plain=1.0) for _ in picked]

    monkeypatch.setattr(robust, "soft_attack", fake)
    cfg = replace(HARD, n_trajectories=3, epochs=2, margin=1.0, robust_prompts=3)  # every pair has its adversary
    data = concept_trajectories(Reference.from_pipe(pipe), PAIRS, 3, steps=6, keep=cfg.keep_steps, guidance=7.5,
                                beta=15.0, image_size=None, seed=0, batch_size=4, cache_dir=tmp_path, progress=False)
    fam = family_of(pipe)
    seen = []
    predict = fam.predict

    def spy(denoiser, z, t, cond, params=None):
        # a training micro-batch: the trained copy (not the reference, pipe.unet) at 2B + B·U rows
        if denoiser is not pipe.unet and len(z) == 2 * cfg.batch_size + cfg.batch_size * cfg.preserve_batch:
            seen.append(cond[:cfg.batch_size].detach().clone())
        return predict(denoiser, z, t, cond, params)

    def gap(edit) -> float:
        z, t = data.latents.flatten(0, 1), data.timesteps.repeat(len(data))  # (N K, C, h, w), (N K,)
        with edit.applied(pipe), torch.no_grad():
            out = pipe.unet(z, t, encoder_hidden_states=far[None].expand(len(z), -1, -1)).sample
        d = (out - data.f_safe.flatten(0, 1)).pow(2).mean((1, 2, 3)) - (out - data.f_unsafe.flatten(0, 1)).pow(2).mean(
            (1, 2, 3))
        return float(d.mean())

    gaps = {}
    for mix in (0.0, 0.5, 1.0):
        seen.clear()
        with monkeypatch.context() as m:
            m.setattr(fam, "predict", spy)
            edit = erase_v(pipe, PAIRS, replace(cfg, robust_mix=mix), cache_dir=tmp_path, progress=False)
        took = [bool(torch.equal(c[0], far)) for c in seen]
        assert len(took) == 6 and edit.info["robust"]["rounds"][0]["trained"]["adversarial_share"] == sum(took) / 6
        if mix in (0.0, 1.0):
            assert all(took) == (mix == 1.0) and any(took) == (mix == 1.0)
        gaps[mix] = gap(edit)
    assert gaps[1.0] < gaps[0.5] < gaps[0.0] - 5e-4, gaps


def test_consistency_holds_the_adversarial_prediction_to_the_plain_one(pipe, tmp_path, monkeypatch):
    """`robust_consistency` κ (module doc 3.): with a far conditioning standing in for the attack's, every sample on
    it (robust_mix=1) also pays κ ||ε̂(z, c^adv) − sg(ε̂(z, c^m))||², so the trained model's predictions under the
    adversary and under its pair's plain prompt end closer together than with Eq. 8 alone; only the trained layers
    change; κ is recorded (and so keyed: the run key hashes the record) only when set."""
    far = 4 * encode_prompts(pipe, ["a yellow triangle on a purple background"])[0]  # (L, D)

    def fake(pipe_, edit, prompts, picked, **kw):
        return [SimpleNamespace(embeds={"prompt_embeds": far.clone()}, objective=0.5, objective_start=1.0,
                                objective_plain=1.0) for _ in picked]

    monkeypatch.setattr(robust, "soft_attack", fake)
    cfg = replace(HARD, n_trajectories=3, epochs=3, robust_prompts=3, robust_mix=1.0)
    data = concept_trajectories(Reference.from_pipe(pipe), PAIRS, 3, steps=6, keep=cfg.keep_steps, guidance=7.5,
                                beta=15.0, image_size=None, seed=0, batch_size=4, cache_dir=tmp_path, progress=False)
    plain_c = encode_prompts(pipe, [m for m, _ in PAIRS])  # (P, L, D)

    def spread(edit) -> float:
        z, t = data.latents.flatten(0, 1), data.timesteps.repeat(len(data))  # (N K, C, h, w), (N K,)
        c = plain_c[data.pair_index].repeat_interleave(data.timesteps.shape[0], 0)  # (N K, L, D)
        with edit.applied(pipe), torch.no_grad():
            a = pipe.unet(z, t, encoder_hidden_states=far[None].expand(len(z), -1, -1)).sample
            b = pipe.unet(z, t, encoder_hidden_states=c).sample
        return float((a - b).pow(2).mean())

    alone = erase_v(pipe, PAIRS, cfg, cache_dir=tmp_path, progress=False)
    held = erase_v(pipe, PAIRS, replace(cfg, robust_consistency=50.0), cache_dir=tmp_path, progress=False)
    assert spread(held) < 0.8 * spread(alone), (spread(held), spread(alone))
    assert set(held.weights) == set(alone.weights)  # the same (visual) layers, nothing else
    assert held.settings["robust_consistency"] == 50.0 and "robust_consistency" not in alone.settings


# --------------------------------------------------------------------------- faults
class _Killed(Exception):
    pass


def _kill_after(n):
    def on_step(step, losses):
        if step == n:
            raise _Killed

    return on_step


def test_resume_after_interruption_gives_the_same_weights(pipe, tmp_path):
    cfg = replace(HARD, robust=2, checkpoint_every=2, robust_mix=0.5)
    cache = tmp_path / "cache"
    whole = erase_v(pipe, PAIRS, cfg, cache_dir=cache, checkpoint_dir=tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()  # a finished run removes its checkpoints and its attacks' files
    for name, keep_attacks in (("b", True), ("c", False)):
        folder = tmp_path / name
        with pytest.raises(_Killed):  # killed after step 3: round 2 (step 2) was found, the checkpoint is step 2's
            erase_v(pipe, PAIRS, cfg, cache_dir=cache, checkpoint_dir=folder, progress=False, on_step=_kill_after(3))
        (ckpt,) = folder.glob("step-*")
        saved = io.load_tensors(ckpt / "adversaries.safetensors")
        assert saved["cond"].shape[0] == 2 and saved["pair"].shape == (2,)  # round 1's, saved with the checkpoint
        assert len(io.read_json(ckpt / "state.json")["robust"]) == 1
        assert len(list((folder / "adversaries").glob("round-2-*"))) == 1
        if not keep_attacks:  # round 2 is then found again, against the very weights of the checkpoint
            shutil.rmtree(folder / "adversaries")
        resumed = erase_v(pipe, PAIRS, cfg, cache_dir=cache, checkpoint_dir=folder, progress=False)
        assert resumed.info["resumed_from_step"] == 2
        assert _same_weights(resumed, whole, atol=1e-6), name
        assert _rounds(resumed) == _rounds(whole)
        assert resumed.info["robust"]["final"] == whole.info["robust"]["final"]


def test_several_processes_need_a_checkpoint_folder(pipe):
    from trce.methods import stage_v

    fake = SimpleNamespace(num_processes=2, is_main_process=True)
    with pytest.raises(TrceError, match="over 2 processes shares each round's adversaries"):
        stage_v.Hardening(pipe, family_of(pipe), PAIRS, torch.zeros(3, 4, 2), (None, None, None, None,
                           torch.tensor([0, 1])), HARD, None, fake, None, 4, False)


def test_the_reference_images_come_from_the_original_model(pipe):
    from trce.testing import tiny_pipeline

    edited = tiny_pipeline(0)  # stands for the stage-T model: other cross-attention keys
    with torch.no_grad():
        for name, param in edited.unet.named_parameters():
            if ".attn2.to_k." in name:
                param.mul_(1.5)
    after_t = {k: v.clone() for k, v in edited.unet.state_dict().items()}
    ref = Reference.from_pipe(edited, pipe.unet)
    with original_pipeline(edited, family_of(edited), ref) as original:
        assert original is edited
        assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in edited.unet.state_dict().items())
    assert all(torch.equal(v, after_t[k]) for k, v in edited.unet.state_dict().items())  # T's edit back
    with original_pipeline(pipe, family_of(pipe), Reference.from_pipe(pipe)) as original:  # stage V alone: itself
        assert original is pipe


# --------------------------------------------------------------------------- the method, Python and CLI
def test_robust_hardens_both_stages_of_trce():
    assert plan("shapeworld-red", T={"robust": 2}).configs["V"].robust == 2
    assert plan("shapeworld-red", T={"robust": 2}, V={"robust": 0}).configs["V"].robust == 0  # V's own wins
    assert plan("shapeworld-red", V={"robust": "3"}).configs["V"].robust == 3  # as --set V.robust=3 gives it
    assert plan("shapeworld-red").configs["V"].robust == 0
    assert plan("shapeworld-red", method="trce-key", T={"robust": 1}).configs["T"].robust == 1  # no V: nothing more


def test_erase_with_robust_hardens_stage_v(tiny_pipe, tmp_path):
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    edit = trce.erase(tiny_pipe, "shapeworld-red", cache=tmp_path, progress=False, robust=1,
                      T={"robust_attack": "closed-form"}, V=V_TINY)
    assert len(edit.info["T"]["robust"]["rounds"]) == 1
    (record,) = edit.info["V"]["robust"]["rounds"]
    assert record["step"] == 0 and record["adversaries"] == 1
    assert edit.settings["V"]["robust"] == 1
    assert all(torch.equal(tiny_pipe.unet.state_dict()[k], v) for k, v in before.items())


def test_cli_erase_with_robust_hardens_stage_v(tiny_dir, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    sets = [a for k, v in V_TINY.items() for a in ("--set", f"V.{k}={v}")]
    code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--method", "trce",
                           "--robust", "1", "--set", "T.robust_attack=closed-form", *sets, "--out", tmp_path / "tv")
    assert code == 0, err
    meta = json.loads((tmp_path / "tv" / "patch.json").read_text())
    assert len(meta["info"]["T"]["robust"]["rounds"]) == 1 and len(meta["info"]["V"]["robust"]["rounds"]) == 1
    assert meta["settings"]["V"]["robust"] == 1
    code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--stages", "V",
                           "--set", "V.robust=2", *sets, "--out", tmp_path / "v")
    assert code == 0, err
    meta = json.loads((tmp_path / "v" / "patch.json").read_text())
    assert [r["round"] for r in meta["info"]["robust"]["rounds"]] == [1, 2]
    code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--stages", "V",
                           "--set", "V.robust_mix=2", *sets, "--out", tmp_path / "bad")
    assert_one_line_error(code, err, "robust_mix must be a number in [0, 1], got 2.0")
