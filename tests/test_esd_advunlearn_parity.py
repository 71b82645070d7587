"""ESD and AdvUnlearn against their reference code, on the tiny pipeline: one training step's regression target,
the attack's target and the trained parameter set are the reference's, computed here from the tokenizer, the text
encoder and the UNet directly (the pipeline is restored bit for bit after training, so its modules are the frozen
original theta), and compared with what trce's step feeds its loss (hooked, not reimplemented).

References (docs/fidelity.md): rohitgandikota/erasing train-scripts/train-esd.py at 6eb7dc8f (the script the paper
ran, removed by 414dc94 "ESD diffusers support"; trce follows it) and esd_sd.py at 25613d27 (the current diffusers
script); OPTML-Group/AdvUnlearn train-scripts/AdvUnlearn.py, utils/attack_util.py, utils/get_loss.py and
utils/util.py at 9d231249.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trce.methods import advunlearn, esd
from trce.methods.advunlearn import AdvUnlearnConfig, erase_advunlearn
from trce.methods.esd import ESDConfig, erase_esd
from trce.methods.training import NoisyLatents


class _Losses:
    """A stand-in for torch.nn.functional in a method's module: every mse_loss call's (prediction, target) kept."""

    def __init__(self):
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __getattr__(self, name):
        return getattr(F, name)

    def mse_loss(self, a, b, *args, **kwargs):
        self.calls.append((a.detach().clone(), b.detach().clone()))
        return F.mse_loss(a, b, *args, **kwargs)


def _recording_latents(samples: list):
    class Recording(NoisyLatents):
        def sample(self, idx):
            z, t = super().sample(idx)
            samples.append((self, idx.clone(), z.clone(), t.clone()))
            return z, t

    return Recording


def _hooked(monkeypatch, module) -> tuple[_Losses, list]:
    losses, samples = _Losses(), []
    monkeypatch.setattr(module, "F", losses)
    monkeypatch.setattr(module, "NoisyLatents", _recording_latents(samples))
    return losses, samples


@torch.no_grad()
def _text(pipe, prompt: str) -> torch.Tensor:
    """The original text encoder's conditioning, as `model.get_learned_conditioning([prompt])`: (1, L, D)."""
    tok = pipe.tokenizer
    ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0].float()


@torch.no_grad()
def _eps(pipe, z, t, cond) -> torch.Tensor:
    """The original UNet's noise prediction, `model_orig.apply_model(z, t, cond)`."""
    return pipe.unet(z, t, encoder_hidden_states=cond.expand(len(z), -1, -1)).sample.float()


def _close(a, b):
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- ESD
# train-scripts/train-esd.py at 6eb7dc8f: argparse defaults (lines 297-307 at b8aeab6, unchanged until removed)
TRAIN_ESD = {"iterations": 1000, "lr": 1e-5, "negative_guidance": 1.0, "sample_guidance": 3.0, "ddim_steps": 50,
             "batch_size": 1}
# esd_sd.py at 25613d27 (the current script) differs: iterations 200, lr 5e-5, negative_guidance 2.0
ESD_SD = {"iterations": 200, "lr": 5e-5, "negative_guidance": 2.0, "sample_guidance": 3.0, "ddim_steps": 50}


def _compvis(name: str) -> str:
    """A diffusers UNet parameter name as the CompVis checkpoint names the layers train-esd.py's filter reads:
    the time embedding MLP is `time_embed`, the output norm and conv `out.0`, `out.2` (every other layer keeps what
    the filter looks at: `attn2` is attn2 in both)."""
    for diffusers, compvis in (("time_embedding.", "time_embed."), ("conv_norm_out.", "out.0."),
                               ("conv_out.", "out.2.")):
        if name.startswith(diffusers):
            return compvis + name[len(diffusers):]
    return name


def _train_esd_filter(name: str, method: str) -> bool:
    """train-esd.py's parameter choice (lines 165-182 at b8aeab6) for `xattn` (ESD-x) and `noxattn` (ESD-u)."""
    if method == "xattn":
        return "attn2" in name
    return not (name.startswith("out.") or "attn2" in name or "time_embed" in name)


def test_esd_defaults_are_train_esd_pys():
    cfg = ESDConfig()
    assert {k: getattr(cfg, k) for k in TRAIN_ESD} == TRAIN_ESD
    assert cfg.params == "cross-attn" and cfg.neutral_prompt == "" and cfg.latents == "current"
    assert {k: getattr(cfg, k) for k in ESD_SD} != ESD_SD  # trce follows the paper's script, not esd_sd.py


@pytest.mark.parametrize("group,method", [("cross-attn", "xattn"), ("non-cross-attn", "noxattn")])
def test_esd_trains_the_references_parameters(tiny_pipe, group, method):
    edit = erase_esd(tiny_pipe, ["a red circle"], ESDConfig(params=group, iterations=1, ddim_steps=2), progress=False)
    reference = {f"unet.{n}" for n, _ in tiny_pipe.unet.named_parameters() if _train_esd_filter(_compvis(n), method)}
    assert set(edit.weights) == reference


def test_one_esd_step_regresses_onto_the_references_target(tiny_pipe, monkeypatch):
    losses, samples = _hooked(monkeypatch, esd)
    prompt = "a red circle"
    erase_esd(tiny_pipe, [prompt], ESDConfig(iterations=2, ddim_steps=3, lr=1e-2), progress=False)
    assert len(losses.calls) == 2 and len(samples) == 2
    e_c, e_0 = _text(tiny_pipe, prompt), _text(tiny_pipe, "")
    for i, ((pred, target), (_, _, z, t)) in enumerate(zip(losses.calls, samples)):
        # loss = criteria(e_n, e_0 - negative_guidance * (e_p - e_0)), e_0 and e_p from the frozen model_orig
        e_p, e_n0 = _eps(tiny_pipe, z, t, e_c), _eps(tiny_pipe, z, t, e_0)
        assert _close(target, e_n0 - 1.0 * (e_p - e_n0)), f"iteration {i + 1}"
        if i == 0:
            assert _close(pred, e_p)  # theta' = theta at the first step
        else:
            assert not _close(pred, e_p)  # the model trained; the target stayed the frozen original's


def test_esd_latents_pair_with_their_timestep(tiny_pipe, monkeypatch):
    """z_t after k DDIM steps goes with the timestep of step k (esd_sd.py: `timesteps[run_till_timestep]`)."""
    _, samples = _hooked(monkeypatch, esd)
    erase_esd(tiny_pipe, ["a red circle"], ESDConfig(iterations=6, ddim_steps=3), progress=False)
    grid = samples[0][0].scheduler.timesteps.tolist()
    assert all(int(t[0]) in grid for *_, t in samples)


# --------------------------------------------------------------------------- AdvUnlearn
# the README's command (README.md:99) over AdvUnlearn.py's argparse defaults (lines 226-261)
ADVUNLEARN = {"iterations": 1000, "lr": 1e-5, "negative_guidance": 1.0, "sample_guidance": 3.0, "ddim_steps": 50,
              "attack_steps": 30, "attack_lr": 1e-3, "attack_init": "random", "warmup": 200, "preserve_weight": 0.3,
              "preserve_batch": 5, "batch_size": 1, "module": "text-encoder"}


def _text_encoder_full(pipe) -> set[str]:
    """utils/util.py param_choices('text_encoder_full', component='all'), lines 41-67: every text_model parameter
    under `encoder` or `final_layer_norm` (not the embeddings). Paths as trce's Edit names them: the installed
    transformers' parameter names, with or without the `text_model.` level."""
    te = pipe.text_encoder
    inner, prefix = (te.text_model, "text_model.") if hasattr(te, "text_model") else (te, "")
    return {f"text_encoder.{prefix}{n}" for n, _ in inner.named_parameters()
            if n.startswith(("final_layer_norm", "encoder"))}


def test_advunlearn_defaults_are_the_published_commands():
    cfg = AdvUnlearnConfig()
    assert {k: getattr(cfg, k) for k in ADVUNLEARN} == ADVUNLEARN
    assert cfg.attack_tokens == 1  # the script's adv_prompt_num default (AdvUnlearn.py), kept by its README command


def test_advunlearn_trains_text_encoder_full(tiny_pipe):
    cfg = AdvUnlearnConfig(iterations=1, warmup=1, ddim_steps=2, preserve_weight=0.0)
    edit = erase_advunlearn(tiny_pipe, ["a red circle"], cfg, progress=False)
    assert set(edit.weights) == _text_encoder_full(tiny_pipe)


def test_one_advunlearn_step_uses_the_references_targets(tiny_pipe, monkeypatch):
    losses, samples = _hooked(monkeypatch, advunlearn)
    prompt, keep = "a red circle", "a blue star"
    cfg = AdvUnlearnConfig(iterations=1, warmup=0, attack_steps=2, attack_lr=1e-2, ddim_steps=3, preserve_batch=1)
    seen: list[torch.Tensor] = []
    handle = tiny_pipe.text_encoder.register_forward_pre_hook(lambda m, args, kw: seen.append(
        (kw.get("input_ids") if kw.get("input_ids") is not None else args[0]).detach().cpu()), with_kwargs=True)
    try:
        edit = erase_advunlearn(tiny_pipe, [prompt], cfg, preserve_prompts=[keep], progress=False)
    finally:
        handle.remove()
    erase = [s for s in samples if s[0] is samples[0][0]]
    kept = [s for s in samples if s[0] is not samples[0][0]]
    assert len(erase) == 2 and len(kept) == 1  # attack step 1 on fresh latents; the utility term on its own
    e_c, e_0, e_k = _text(tiny_pipe, prompt), _text(tiny_pipe, ""), _text(tiny_pipe, keep)
    (_, _, z0, t0), (_, _, z1, t1) = erase
    (_, _, zk, tk) = kept[0]
    atk0, atk1, unlearn, retain = losses.calls[:4]
    # the attack: criteria(e_n(adv), e_p), e_p the frozen model on the plain prompt (attack_util.py:185-203)
    assert _close(atk0[1], _eps(tiny_pipe, z0, t0, e_c)) and _close(atk1[1], _eps(tiny_pipe, z1, t1, e_c))
    # the outer step: ESD's target (get_loss.py:352) ...
    e_p, e_n0 = _eps(tiny_pipe, z0, t0, e_c), _eps(tiny_pipe, z0, t0, e_0)
    assert _close(unlearn[1], e_n0 - 1.0 * (e_p - e_n0))
    # ... plus retain_loss_w x criteria(retain_e_n, retain_e_p), retain_e_p the frozen model (get_loss.py:325-360)
    assert _close(retain[1], _eps(tiny_pipe, zk, tk, e_k))
    assert _close(retain[0], retain[1])  # phi = theta at the first step: the utility term starts at 0
    h = edit.info["history"]
    assert h["loss"][0] == pytest.approx(h["unlearn"][0] + 0.3 * h["retain"][0], rel=1e-5)
    # the adversarial prompt is [start; k prefix slots; prompt; end] (construct_id 'prefix_k'): the ids the text
    # encoder read with the prefix's embeddings at positions 1..k
    tok = tiny_pipe.tokenizer
    body = tok(prompt, add_special_tokens=False).input_ids
    k = cfg.attack_tokens
    prefixed = [row for ids in seen for row in ids if row[1 + k: 1 + k + len(body)].tolist() == body]
    assert prefixed and all(int(row[0]) == tok.bos_token_id and int(row[1 + k + len(body)]) == tok.eos_token_id
                            for row in prefixed)


def test_advunlearn_warmup_is_esd_on_the_text_encoder(tiny_pipe, monkeypatch):
    losses, samples = _hooked(monkeypatch, advunlearn)
    prompt = "a red circle"
    cfg = AdvUnlearnConfig(iterations=1, warmup=1, ddim_steps=3, preserve_weight=0.0)
    erase_advunlearn(tiny_pipe, [prompt], cfg, progress=False)
    ((pred, target),) = losses.calls
    ((_, _, z, t),) = samples
    e_c, e_0 = _text(tiny_pipe, prompt), _text(tiny_pipe, "")
    e_p, e_n0 = _eps(tiny_pipe, z, t, e_c), _eps(tiny_pipe, z, t, e_0)
    assert _close(target, e_n0 - 1.0 * (e_p - e_n0)) and _close(pred, e_p)
