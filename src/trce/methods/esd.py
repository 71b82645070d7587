"""ESD, the fine-tuning baseline (Gandikota et al. 2023, "Erasing Concepts from Diffusion Models").

The UNet being erased, theta', is trained so that on the erase prompt c_e it predicts the original model's
noise negatively guided away from the concept:

    theta' <- theta' - eta grad || eps_theta'(z_t, c_e) - [ eps_theta(z_t, c_n) - eta_n (eps_theta(z_t, c_e) - eps_theta(z_t, c_n)) ] ||^2

with c_n the empty prompt and eta_n the negative guidance (1 in the paper). Parameter groups as the paper
names them: ESD-x trains cross-attention (`cross-attn`: objects, styles), ESD-u everything else
(`non-cross-attn`: nudity). This is KPOP's removal loss without the prompt (its L2 term), so the two share
their machinery (`trce.methods.training`): the noisy latents z_t (`current`: denoised by the current model, ESD's
recipe; `cached`: trajectories of the original model), the frozen original outputs through
`torch.func.functional_call`, fp32 training with the pipeline restored bit for bit, and resumable checkpoints.

Reference: rohitgandikota/erasing `train-scripts/train-esd.py` (the script the paper ran; last at 6eb7dc8f, removed
by 414dc94 for the diffusers `esd_sd.py`): its defaults (1000 iterations, lr 1e-5, negative guidance 1, start
guidance 3, 50 DDIM steps, batch 1), its parameter filters (`xattn`: every `attn2` parameter; `noxattn`: all but
`attn2`, `time_embed` and the output layers `out.`) and its latents (denoised by the model being trained). One
documented difference (docs/fidelity.md): z_t after k of the DDIM steps is paired with the timestep of step k,
as `esd_sd.py` does; train-esd.py queries the UNet at a DDPM timestep drawn from [20k', 20k'+20) for a latent
about two DDIM steps less noisy (its `till_T` stops after step k'-1). `tests/test_esd_advunlearn_parity.py`
checks the target and the parameter sets against the reference's, computed independently.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from trce.edit import Edit
from trce.errors import TrceError, choose
from trce.families import family_of
from trce.methods.kpop import Group, Latents
from trce.methods.training import (
    NoisyLatents,
    check_numbers,
    encode_prompts,
    endpoints,
    finite_loss,
    restore_state,
    run_checkpoints,
    save_state,
    training_state,
)
from trce.registry import Context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ESDConfig:
    """Every ESD setting; recorded in the patch's `settings`. Defaults: train-esd.py's (1000 steps, lr 1e-5,
    negative guidance 1, sample guidance 3, 50 DDIM steps); the group ESD-x (the script has no default)."""

    iterations: int = 1000
    lr: float = 1e-5
    negative_guidance: float = 1.0  # eta_n
    params: Group = "cross-attn"  # ESD-x; "non-cross-attn" is ESD-u
    neutral_prompt: str = ""  # c_n
    batch_size: int = 1
    seed: int = 0
    latents: Latents = "current"
    ddim_steps: int = 50
    sample_guidance: float = 3.0
    cache_trajectories: int = 4
    checkpoint_every: int = 100  # iterations between checkpoints (operational: not part of the run's key)

    def __post_init__(self) -> None:
        for name, kind in (("params", Group), ("latents", Latents)):
            choose(f"ESD {name}", getattr(self, name), get_args(kind))
        check_numbers(self, "ESD", integers=("iterations", "batch_size", "ddim_steps", "cache_trajectories",
                                             "checkpoint_every"),
                      positive=("lr",), non_negative=("negative_guidance", "sample_guidance"))
        if not isinstance(self.neutral_prompt, str):
            raise TrceError(f"ESD neutral_prompt must be a string, got {self.neutral_prompt!r}")


def erase_esd(pipe, erase_prompts: list[str], config: ESDConfig = ESDConfig(), *, spec: dict | None = None,
              progress: bool = True, checkpoint_dir: str | Path | None = None, checkpoint_every: int | None = None,
              cache_dir: str | Path | None = None) -> Edit:
    """Erase the concept of `erase_prompts` with ESD; returns the Edit (the pipeline is left unchanged).

    The state is saved every `checkpoint_every` iterations in `checkpoint_dir` (or, without one, in
    `<cache_dir>/runs/esd-<key>`; neither: no checkpoints) and a rerun with the same settings continues from
    there; a finished run removes its checkpoints.
    """
    if isinstance(erase_prompts, str) or not erase_prompts or not all(isinstance(p, str) and p.strip()
                                                                       for p in erase_prompts):
        raise TrceError(f"ESD needs a non-empty list of non-empty erase prompts, got {erase_prompts!r}")
    checkpoint_every = config.checkpoint_every if checkpoint_every is None else checkpoint_every
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise TrceError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    from trce.edit import fingerprint

    t_start = time.time()
    base = fingerprint(pipe)
    family = family_of(pipe)
    unet = family.denoiser(pipe)
    device = unet.device
    erase_emb = encode_prompts(pipe, list(erase_prompts), device=device)  # (n, m_c, d)
    neutral_emb = encode_prompts(pipe, [config.neutral_prompt], device=device)  # (1, m_c, d)
    uncond = family.unconditional(pipe).to(device=device, dtype=torch.float32)  # (1, m_c, d): CFG's unconditional half
    trainable = family.trainable(unet, config.params)
    settings = {**dataclasses.asdict(config), "erase_prompts": list(erase_prompts),
                "trainable": {"group": config.params, "tensors": len(trainable),
                              "parameters": sum(p.numel() for p in trainable.values())}}
    gen = torch.Generator("cpu").manual_seed(config.seed)
    ckpt = run_checkpoints("esd", settings, base, checkpoint_dir, cache_dir)
    with training_state(unet, trainable) as originals:
        params = dict(unet.named_parameters())
        train = [params[name] for name in trainable]
        opt = torch.optim.Adam(train, lr=config.lr)
        start, saved = restore_state(ckpt, list(trainable), train, opt, gen)
        history: dict[str, list[float]] = saved or {"loss": []}
        latents = NoisyLatents(pipe, unet, config, erase_emb, uncond, gen, originals)
        t_loop = time.time()
        with tqdm(total=config.iterations, initial=start, desc="esd", disable=not progress, mininterval=1) as bar:
            for it in range(start, config.iterations):
                idx = torch.randint(len(erase_emb), (config.batch_size,), generator=gen)  # (b,)
                z, t = latents.sample(idx)  # (b, c, h, w), (b,)
                c_e = erase_emb[idx]  # (b, m_c, d)
                with torch.no_grad():  # the frozen original theta on c_e and c_n at once
                    both = family.predict(unet, torch.cat([z, z]), torch.cat([t, t]),
                                          torch.cat([c_e, neutral_emb.expand(len(idx), -1, -1)]), originals)
                    eps_e, eps_n = both.chunk(2)  # (b, c, h, w) each
                    target = eps_n - config.negative_guidance * (eps_e - eps_n)
                loss = F.mse_loss(family.predict(unet, z, t, c_e), target)
                value = finite_loss(loss, "ESD", it + 1, config.iterations, ckpt, f"lower lr ({config.lr})")
                grads = torch.autograd.grad(loss, train)
                for p, g in zip(train, grads):
                    p.grad = g
                opt.step()
                opt.zero_grad(set_to_none=True)
                history["loss"].append(value)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                if ckpt is not None and (it + 1) % checkpoint_every == 0 and it + 1 < config.iterations:
                    save_state(ckpt, it + 1, list(trainable), train, opt, gen, history)
        t_loop = time.time() - t_loop
        weights = {f"{family.denoiser_name}.{name}": params[name].detach().cpu().clone() for name in trainable}  # fp32
    done = config.iterations - start
    info: dict[str, Any] = {
        "iterations": config.iterations, "resumed_from": start, "loss": endpoints(history),
        "history": {k: v[:: max(1, len(v) // 100)] for k, v in history.items()},
        "history_every": max(1, len(history["loss"]) // 100), "seconds": round(time.time() - t_start, 3),
        "seconds_per_iteration": round(t_loop / max(1, done), 5), "device": str(device),
    }
    log.info("ESD: %d iterations in %.1f s; loss %s", done, info["seconds"], info["loss"]["loss"])
    if ckpt is not None:
        ckpt.finish()
    return Edit(weights=weights, method="esd", spec=spec or {"erase": list(erase_prompts)}, settings=settings,
                base=base, info=info)


def run(pipe, specs, config: ESDConfig, context: Context) -> Edit:
    """ESD (the registry's stage function): the specs' malicious prompts are the erase prompts c_e; checkpoints go
    under the context's cache (a killed run resumes)."""
    from trce.concepts import spec_record
    from trce.methods.prior import cache_dir

    prompts = list(dict.fromkeys(p.malicious for s in specs for p in s.pairs()))
    return erase_esd(pipe, prompts, config, spec=spec_record(specs), progress=context.progress,
                     checkpoint_dir=context.checkpoint_dir,
                     cache_dir=cache_dir(context.cache_dir) if context.use_cache else None)
