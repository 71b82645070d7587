"""TRCE stage V (denoising trajectory steering) on tiny random components."""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import replace

import pytest
import torch

from trce.errors import TrceError
from trce.families import family_of
from trce.methods import trajectories
from trce.methods.stage_v import (
    StageVConfig,
    epoch_plan,
    erase_v,
    repelled_safe,
    settings_record,
    stage_v_loss,
    trainable_parameters,
    triplet_loss,
)
from trce.methods.trajectories import Reference, concept_trajectories, initial_noise, uncond_trajectories
from trce.utils import cachefile, io

PAIRS = [("a red circle", "a blue circle"), ("a red square", "a blue square"), ("a red star", "a green star")]
TINY = StageVConfig(n_trajectories=4, n_uncond=8, ddim_steps=6, epochs=1, preserve_batch=2, cache_batch_size=4,
                    checkpoint_every=0)


@pytest.fixture(scope="module")
def pipe():
    from trce.testing import tiny_pipeline

    return tiny_pipeline(0)


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize(("field", "value", "needle"), [
    ("mixed_precision", "bf17", "'bf17'"), ("n_trajectories", 0, "n_trajectories"),
    ("keep_fraction", 1.5, "1.5"), ("lr", 0.0, "lr"),
])
def test_config_names_the_bad_value(field, value, needle):
    with pytest.raises(TrceError, match=needle):
        StageVConfig(**{field: value})


def test_half_precision_needs_a_gpu(pipe):
    with pytest.raises(TrceError, match="'bf16' needs a CUDA GPU"):
        erase_v(pipe, PAIRS, replace(TINY, mixed_precision="bf16"), progress=False)


def test_keep_steps_are_the_first_half():
    assert StageVConfig().keep_steps == 25  # steps 0-24 of 50
    assert replace(TINY, ddim_steps=6).keep_steps == 3


# --------------------------------------------------------------------------- the loss (Eq. 8, 9)
def test_triplet_loss_is_the_hinge_of_mean_squared_distances():
    gen = torch.Generator().manual_seed(0)
    pred, fs, fu = (torch.randn(5, 4, 3, 3, generator=gen) for _ in range(3))
    expected = torch.clamp(((pred - fs) ** 2).mean((1, 2, 3)) - ((pred - fu) ** 2).mean((1, 2, 3)) + 0.01, min=0)
    assert torch.allclose(triplet_loss(pred, fs, fu, 0.01), expected)


def test_loss_is_zero_when_prediction_is_margin_closer_to_safe():
    gen = torch.Generator().manual_seed(1)
    fs, fu = torch.randn(3, 4, 4, 4, generator=gen), torch.randn(3, 4, 4, 4, generator=gen)
    # ε̂ = f_safe + a little noise: d_safe ≈ 1e-4 while d_unsafe ≈ 2, far beyond the margin.
    pred = (fs + 0.01 * torch.randn(3, 4, 4, 4, generator=gen)).requires_grad_(True)
    target = torch.randn(6, 4, 4, 4, generator=gen)
    parts = stage_v_loss(pred, pred, target.clone().requires_grad_(True), fs, fu, target, margin=0.01,
                         lambda_preserve=100.0)
    assert float(parts["total"].detach()) == 0.0 and float(parts["active"]) == 0.0
    parts["total"].backward()
    assert torch.count_nonzero(pred.grad) == 0
    # Margin-closer to the unsafe target instead: the loss is the distance gap plus the margin.
    gap = triplet_loss(fu, fs, fu, 0.01)
    assert torch.allclose(gap, ((fu - fs) ** 2).mean((1, 2, 3)) + 0.01)


def test_preservation_term_is_weighted_mse():
    gen = torch.Generator().manual_seed(2)
    fs = torch.randn(2, 4, 2, 2, generator=gen)
    pp, tp = torch.randn(4, 4, 2, 2, generator=gen), torch.randn(4, 4, 2, 2, generator=gen)
    parts = stage_v_loss(fs, fs, pp, fs, fs + 10, tp, margin=0.01, lambda_preserve=7.0)
    assert torch.allclose(parts["total"], 7.0 * ((pp - tp) ** 2).mean())


def test_repelled_safe_target_is_eq7_plus_negative_guidance_away_from_the_concept():
    gen = torch.Generator().manual_seed(3)
    e0, em, es = (torch.randn(2, 4, 3, 3, generator=gen) for _ in range(3))
    beta, gamma = 15.0, 0.5
    fu, fs = e0 + beta * (em - e0), e0 + beta * (es - e0)  # Eq. 6, 7
    assert repelled_safe(fs, fu, 0.0) is fs  # the paper's target, untouched
    want = e0 + beta * (es - e0) + gamma * beta * (es - em)
    assert torch.allclose(repelled_safe(fs, fu, gamma), want, atol=1e-5)
    # the hinge stays on longer: a prediction just past the paper's bisector is still penalised under γ > 0
    pred = 0.5 * (fs + fu) + 0.02 * (fs - fu)
    assert float(triplet_loss(pred, fs, fu, 0.0).max()) == 0.0
    assert float(triplet_loss(pred, repelled_safe(fs, fu, gamma), fu, 0.0).min()) > 0.0


def test_repel_is_recorded_and_keyed_only_when_set(pipe, tmp_path):
    plain = erase_v(pipe, PAIRS, replace(TINY, lr=1e-3), cache_dir=tmp_path, progress=False)
    pushed = erase_v(pipe, PAIRS, replace(TINY, lr=1e-3, repel=1.0), cache_dir=tmp_path, progress=False)
    assert "repel" not in plain.settings and pushed.settings["repel"] == 1.0
    # what the run key hashes (a run made before `repel` existed resumes)
    assert "repel" not in settings_record(TINY) and settings_record(replace(TINY, repel=0.5))["repel"] == 0.5
    assert any(not torch.equal(plain.weights[k], pushed.weights[k]) for k in plain.weights)
    with pytest.raises(TrceError, match="repel"):
        StageVConfig(repel=-1.0)


# --------------------------------------------------------------------------- trainable parameters
def test_only_attn1_and_attn2_to_q_receive_gradients(pipe):
    unet = copy.deepcopy(pipe.unet)
    chosen = trainable_parameters(unet, family_of(pipe))
    names = [n for n, _ in unet.named_parameters()]
    expected = {n for n in names if ".attn1." in n or ".attn2.to_q." in n}
    assert set(chosen) == expected and any(".attn2.to_q." in n for n in chosen)
    b = 2
    z, emb = torch.randn(b, 4, 8, 8), torch.randn(b, 32, 32)
    out = unet(z, torch.tensor([900, 500]), encoder_hidden_states=emb).sample
    stage_v_loss(out, out, out, torch.zeros_like(out), torch.ones_like(out), torch.zeros_like(out), margin=1.0,
                 lambda_preserve=1.0)["total"].backward()
    for name, param in unet.named_parameters():
        if name in expected:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None and not param.requires_grad, name


def test_only_named_parameters_change_and_pipe_is_untouched(pipe, tmp_path):
    before = _state(pipe.unet)
    edit = erase_v(pipe, PAIRS, replace(TINY, lr=1e-4), cache_dir=tmp_path, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())  # pipe not modified
    expected = {f"unet.{n}" for n, _ in pipe.unet.named_parameters() if ".attn1." in n or ".attn2.to_q." in n}
    assert set(edit.weights) == expected
    for path, value in edit.weights.items():
        assert not torch.equal(value, before[path.removeprefix("unet.")]), f"{path} did not change"
    with edit.applied(pipe):
        after = pipe.unet.state_dict()
        changed = {f"unet.{k}" for k in before if not torch.equal(after[k], before[k])}
    assert changed == expected
    assert edit.method == "trce" and edit.settings["stage"] == "V" and edit.settings["beta"] == 15.0 and edit.settings["epochs"] == 1
    assert edit.info["steps"] == 4 and edit.info["loss_last"]["total"] >= 0
    assert edit.base["id"] == edit.info["reference"]
    json.dumps(edit.info)  # the patch records it as JSON


def test_params_widens_the_trained_group_to_a_union_and_only_it_changes(pipe, tmp_path):
    before = _state(pipe.unet)
    config = replace(TINY, lr=1e-4, params="visual+non-cross-attn")
    edit = erase_v(pipe, PAIRS, config, cache_dir=tmp_path, progress=False)
    fam = family_of(pipe)
    union = {**fam.trainable(pipe.unet, "visual"), **fam.trainable(pipe.unet, "non-cross-attn")}
    assert set(edit.weights) == {f"unet.{n}" for n in union}
    assert not any(".attn2.to_k." in p or ".attn2.to_v." in p for p in edit.weights)  # stage T's layers untouched
    assert any(".resnets." in p for p in edit.weights) and any(".attn1." in p for p in edit.weights)
    with edit.applied(pipe):
        after = pipe.unet.state_dict()
        changed = {f"unet.{k}" for k in before if not torch.equal(after[k], before[k])}
    assert changed == set(edit.weights)
    assert edit.settings["params"] == "visual+non-cross-attn" and "params" not in settings_record(TINY)
    for bad, needle in (("visal", "did you mean 'visual'"), ("visual+visual", "twice"), (3, "joined by")):
        with pytest.raises(TrceError, match=needle):
            StageVConfig(params=bad)


# --------------------------------------------------------------------------- trajectory cache
def _encode(pipe, prompts):
    return pipe.encode_prompt(list(prompts), pipe.device, 1, False)[0]


def test_cached_targets_equal_targets_computed_on_the_fly(pipe, tmp_path):
    ref = Reference.from_pipe(pipe)
    cfg = TINY
    data = concept_trajectories(ref, PAIRS, 3, steps=cfg.ddim_steps, keep=cfg.keep_steps, guidance=7.5, beta=15.0,
                                image_size=None, seed=0, batch_size=2, cache_dir=tmp_path, progress=False)
    assert data.latents.shape == (3, cfg.keep_steps, 4, 8, 8)
    null = _encode(pipe, [""])
    sched = ref.scheduler(cfg.ddim_steps)
    assert torch.equal(data.timesteps, sched.timesteps[:cfg.keep_steps])
    with torch.no_grad():
        for n in range(3):
            m, s = PAIRS[int(data.pair_index[n])]
            em, es = _encode(pipe, [m]), _encode(pipe, [s])
            assert torch.equal(data.latents[n, 0], initial_noise("concept-noise", 0, n, (4, 8, 8)))
            for k, t in enumerate(data.timesteps):
                z = data.latents[n, k][None]
                e0, e_m, e_s = (pipe.unet(z, t, encoder_hidden_states=e).sample for e in (null, em, es))
                # β = 15 multiplies the ~1e-6 rounding of batched against single UNet calls.
                assert torch.allclose(data.f_unsafe[n, k][None], e0 + 15.0 * (e_m - e0), atol=1e-4)  # Eq. 6
                assert torch.allclose(data.f_safe[n, k][None], e0 + 15.0 * (e_s - e0), atol=1e-4)  # Eq. 7
    # The latents are the diffusers pipeline's own DDIM trajectory (captured with callback_on_step_end).
    seen = []

    def capture(_pipe, _i, _t, kwargs):
        seen.append(kwargs["latents"].clone())
        return kwargs

    m = PAIRS[int(data.pair_index[1])][0]
    pipe(prompt=m, latents=data.latents[1, 0][None], num_inference_steps=cfg.ddim_steps, guidance_scale=7.5,
         output_type="latent", callback_on_step_end=capture)
    # Guidance 7.5 amplifies the ~1e-7 rounding of batched against single UNet calls at every step, so the
    # trajectories agree to about 1e-5 relative after a few steps (CPU kernels differ between machines).
    for k in range(1, cfg.keep_steps):
        assert torch.allclose(seen[k - 1][0], data.latents[1, k], rtol=1e-4, atol=1e-4)


def test_uncond_targets_are_the_reference_prediction(pipe, tmp_path):
    ref = Reference.from_pipe(pipe)
    data = uncond_trajectories(ref, 6, steps=6, image_size=None, seed=0, batch_size=2, cache_dir=tmp_path,
                               progress=False)
    sched = ref.scheduler(6)
    null = _encode(pipe, [""])
    with torch.no_grad():
        for n in range(6):
            assert int(data.timesteps[n]) == int(sched.timesteps[int(data.step[n])])
            eps = pipe.unet(data.latents[n][None], data.timesteps[n], encoder_hidden_states=null).sample
            assert torch.allclose(data.target[n][None], eps, atol=1e-5)
            if data.step[n] == 0:
                assert torch.equal(data.latents[n], initial_noise("uncond-noise", 0, n, (4, 8, 8)))
    assert data.step.min() >= 0 and data.step.max() < 6


def test_cond_preserve_points_lie_on_the_guided_trajectories_of_preservation_prompts(pipe, tmp_path):
    from trce.methods.trajectories import cond_trajectories

    prompts = ["a blue circle", "a green square", "a yellow star"]
    ref = Reference.from_pipe(pipe)
    data = cond_trajectories(ref, prompts, 6, steps=6, guidance=7.5, image_size=None, seed=0, batch_size=2,
                             cache_dir=tmp_path, progress=False)
    sched = ref.scheduler(6)
    null = _encode(pipe, [""])
    assert sorted(set(data.prompt_index.tolist())) == [0, 1, 2]  # the prompts cycle through the trajectories
    with torch.no_grad():
        for n in range(6):
            c = _encode(pipe, [prompts[int(data.prompt_index[n])]])
            assert int(data.timesteps[n]) == int(sched.timesteps[int(data.step[n])])
            # the target is the original's CONDITIONAL prediction at the point (Eq. 9 with c^p for ∅)
            eps = pipe.unet(data.latents[n][None], data.timesteps[n], encoder_hidden_states=c).sample
            assert torch.allclose(data.target[n][None], eps, atol=1e-5)
            # and the point is where guided sampling of that prompt stands after data.step[n] steps
            z = initial_noise("cond-noise", 0, n, (4, 8, 8))[None] * sched.init_noise_sigma
            for t in sched.timesteps[:int(data.step[n])]:
                x = sched.scale_model_input(z, t)
                e0, ec = (pipe.unet(x, t, encoder_hidden_states=e).sample for e in (null, c))
                z = sched.step(e0 + 7.5 * (ec - e0), t, z).prev_sample
            assert torch.allclose(data.latents[n], sched.scale_model_input(z, data.timesteps[n])[0], atol=1e-4)
    again = cond_trajectories(ref, prompts, 6, steps=6, guidance=7.5, image_size=None, seed=0, batch_size=2,
                              cache_dir=tmp_path, progress=False)
    assert torch.equal(again.latents, data.latents) and again.path == data.path  # cached, reused
    with pytest.raises(TrceError, match="preservation prompts"):
        cond_trajectories(ref, [], 2, steps=6, guidance=7.5, image_size=None, seed=0, batch_size=2)


def test_cond_preserve_adds_the_preservation_prompts_mse_at_their_own_points(pipe, tmp_path):
    gen = torch.Generator().manual_seed(4)
    fs, fu, pu, tu, pc, tc = (torch.randn(2, 4, 3, 3, generator=gen) for _ in range(6))
    both = stage_v_loss(fs, fs, pu, fs, fu, tu, margin=0.0, lambda_preserve=10.0, pred_cp=pc, target_cp=tc)
    want = ((pu - tu) ** 2).mean() + ((pc - tc) ** 2).mean()
    assert torch.allclose(both["preserve"], want) and torch.allclose(both["total"], both["erase"] + 10.0 * want)
    keep = ["a blue circle", "a green square", "a yellow star", "a blue star"]
    plain = erase_v(pipe, PAIRS, TINY, cache_dir=tmp_path, progress=False)
    held = erase_v(pipe, PAIRS, replace(TINY, cond_preserve=16), cache_dir=tmp_path, progress=False,
                   preserve_prompts=keep)
    assert "cond_preserve" not in plain.settings and held.settings["cond_preserve"] == 16
    assert held.info["cache"]["cond"]["key"]["n_prompts"] == 4
    # before the first step the trained copy IS the original: each point, its prompt and its target line up exactly
    assert held.info["loss_first"]["preserve"] < 1e-10
    assert held.info["loss_first"]["erase"] == pytest.approx(plain.info["loss_first"]["erase"])  # same batches
    with pytest.raises(TrceError, match="cond_preserve"):
        StageVConfig(cond_preserve=-1)


def test_cache_is_reused_extended_and_never_mixed(pipe, tmp_path, monkeypatch, caplog):
    ref = Reference.from_pipe(pipe)
    built: list[int] = []
    real = trajectories._concept_rows

    def counting(ref_, indices, *args, **kwargs):
        built.extend(indices)
        return real(ref_, indices, *args, **kwargs)

    monkeypatch.setattr(trajectories, "_concept_rows", counting)
    kw = {"steps": 6, "keep": 3, "guidance": 7.5, "beta": 15.0, "image_size": None, "seed": 0, "batch_size": 4,
          "cache_dir": tmp_path, "progress": False}
    two = concept_trajectories(ref, PAIRS, 2, **kw)
    assert built == [0, 1] and two.path.exists()
    four = concept_trajectories(ref, PAIRS, 4, **kw)
    assert built == [0, 1, 2, 3]  # only the missing two were generated
    assert four.path == two.path and torch.equal(four.latents[:2], two.latents)
    assert torch.equal(four.f_safe[:2], two.f_safe)
    three = concept_trajectories(ref, PAIRS, 3, **kw)
    assert built == [0, 1, 2, 3] and len(three) == 3 and torch.equal(three.latents, four.latents[:3])
    # The extension equals a fresh build of four.
    fresh = concept_trajectories(ref, PAIRS, 4, **{**kw, "cache_dir": tmp_path / "fresh"})
    assert torch.allclose(fresh.f_unsafe, four.f_unsafe, atol=1e-6)
    # Other settings: another file, nothing reused.
    other = concept_trajectories(ref, PAIRS, 2, **{**kw, "beta": 10.0})
    assert other.path != four.path and built[-2:] == [0, 1]
    assert len(list(tmp_path.glob("concept-*.safetensors"))) == 2
    # A file whose stored key does not match its name is never used: it is rebuilt (the same values).
    tensors = io.load_tensors(four.path)
    cachefile.save(four.path, tensors, {**four.key, "beta": 1.0})
    with caplog.at_level(logging.WARNING):
        rebuilt = concept_trajectories(ref, PAIRS, 2, **kw)
    assert "made for other settings" in caplog.text and built[-2:] == [0, 1]
    assert torch.allclose(rebuilt.f_unsafe, four.f_unsafe[:2], atol=1e-6)


# --------------------------------------------------------------------------- faults
def test_batch_order_is_a_pure_function_of_seed_and_epoch():
    a = epoch_plan(3, 1, 5, 3, 8, batch_size=2, grad_accum=1, world=1, preserve_batch=2)
    b = epoch_plan(3, 1, 5, 3, 8, batch_size=2, grad_accum=1, world=1, preserve_batch=2)
    c = epoch_plan(3, 2, 5, 3, 8, batch_size=2, grad_accum=1, world=1, preserve_batch=2)
    assert torch.equal(a.trajectory, b.trajectory) and torch.equal(a.uncond, b.uncond)
    assert not torch.equal(a.trajectory, c.trajectory)
    assert a.steps == 3 and set(a.trajectory.flatten()[:5].tolist()) == set(range(5))  # each once, then padding
    assert a.step.max() < 3 and a.uncond.max() < 8


class _Killed(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted_run(pipe, tmp_path):
    cfg = replace(TINY, lr=1e-4, checkpoint_every=2, grad_accum=1)
    whole = erase_v(pipe, PAIRS, cfg, cache_dir=tmp_path / "cache", checkpoint_dir=tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()  # a finished run removes its checkpoints

    def kill_after_3(step, losses):
        if step == 3:
            raise _Killed  # as if killed: nothing beyond the checkpoint of step 2 is saved

    with pytest.raises(_Killed):
        erase_v(pipe, PAIRS, cfg, cache_dir=tmp_path / "cache", checkpoint_dir=tmp_path / "b", progress=False,
                on_step=kill_after_3)
    assert [p.name for p in (tmp_path / "b").glob("step-*")] == ["step-00000002"]
    with pytest.raises(TrceError, match="another stage V run"):
        erase_v(pipe, PAIRS, replace(cfg, lr=2e-4), cache_dir=tmp_path / "cache", checkpoint_dir=tmp_path / "b",
                progress=False)
    resumed = erase_v(pipe, PAIRS, cfg, cache_dir=tmp_path / "cache", checkpoint_dir=tmp_path / "b", progress=False)
    assert resumed.info["resumed_from_step"] == 2
    for path, value in whole.weights.items():
        assert torch.allclose(resumed.weights[path], value, rtol=0, atol=1e-6), path
    for got, want in zip(resumed.info["loss_curve"], whole.info["loss_curve"], strict=True):
        assert got == pytest.approx(want, abs=1e-6)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(pipe, tmp_path):
    cfg = replace(TINY, checkpoint_every=1)
    ref = Reference.from_pipe(pipe)
    data = concept_trajectories(ref, PAIRS, cfg.n_trajectories, steps=cfg.ddim_steps, keep=cfg.keep_steps,
                                guidance=cfg.sample_guidance, beta=cfg.beta, image_size=None, seed=cfg.seed,
                                batch_size=4, cache_dir=tmp_path, progress=False)
    plan = epoch_plan(cfg.seed, 0, cfg.n_trajectories, cfg.keep_steps, cfg.n_uncond, batch_size=1, grad_accum=1,
                      world=1, preserve_batch=cfg.preserve_batch)
    poisoned = int(plan.trajectory[2].flatten()[0])  # drawn by the third step
    tensors = io.load_tensors(data.path)
    tensors["f_safe"][poisoned] = float("nan")
    cachefile.save(data.path, tensors, data.key)  # a valid cache file holding a NaN target
    ckpt = tmp_path / "run"
    with pytest.raises(TrceError, match=r"not finite\) at step 3 of 4.*step 2\) is kept"):
        erase_v(pipe, PAIRS, cfg, cache_dir=tmp_path, checkpoint_dir=ckpt, progress=False)
    kept = sorted(p.name for p in ckpt.glob("step-*"))
    assert kept == ["step-00000002"]
    state = io.read_json(ckpt / kept[0] / "state.json")
    assert state["step"] == 2 and all(math.isfinite(v) for row in state["losses"] for v in row)
    params = io.load_tensors(ckpt / kept[0] / "params.safetensors")
    assert all(torch.isfinite(t).all() for t in params.values())


def test_reference_is_the_original_model_when_stage_t_ran_first(pipe, tmp_path):
    from trce.edit import fingerprint
    from trce.testing import tiny_pipeline

    edited = tiny_pipeline(0)  # stands for the stage-T model: other cross-attention keys
    with torch.no_grad():
        for name, param in edited.unet.named_parameters():
            if ".attn2.to_k." in name:
                param.mul_(1.5)
    v_alone = erase_v(edited, PAIRS, TINY, cache_dir=tmp_path, progress=False)
    t_then_v = erase_v(edited, PAIRS, TINY, reference=pipe.unet, cache_dir=tmp_path, progress=False)
    assert t_then_v.base["id"] == t_then_v.info["reference"] == fingerprint(pipe)["id"]
    assert v_alone.info["reference"] == fingerprint(edited)["id"] != t_then_v.info["reference"]
    # The original's trajectories are the ones the original pipeline itself caches (same file, reused).
    direct = erase_v(pipe, PAIRS, TINY, cache_dir=tmp_path, progress=False)
    assert direct.info["cache"] == t_then_v.info["cache"]
    assert len(list(tmp_path.glob("concept-*.safetensors"))) == 2
