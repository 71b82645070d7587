"""TRCE stage V: denoising trajectory steering (paper Sec. 4.2, Eq. 6-9).

`erase_v(pipe, pairs, config)` fine-tunes the "visual" layers of `pipe`'s UNet (every `attn1.*`
parameter and `attn2.to_q.*`, nothing else) so that, on the early half of the original model's
DDIM trajectories for the malicious prompts, its predictions move toward the original model's
guidance-enhanced *safe* prediction and away from the *unsafe* one (Eq. 8), while an
unconditional preservation loss (Eq. 9) keeps the rest of its behaviour. It returns an `Edit` with
the trained tensors; `pipe` itself is not modified (training runs on a float32 copy of its UNet).

The reference: every target comes from the frozen ORIGINAL model. When stage T ran first, `pipe`
carries T's edit and the caller must pass the original model (before T) as `reference` (a
pipeline or its UNet). Without `reference`, `pipe` itself is the reference: that is TRCE(V) alone.

Speed: the reference is never called in the training loop. `trajectories.py` runs DDIM with the
reference once, batched, keeps z_t^m for steps 0..keep-1 and computes f_unsafe / f_safe (Eq. 6/7)
and the Eq. 9 targets while sampling; the caches live on disk and are shared across runs.

The stage's parts: `stage_v_config` (the settings), `stage_v_loss` (Eq. 8, 9), `stage_v_train` (batch order,
accelerate, checkpoints and resumption, the loop) and `stage_v_hardening` (`robust=R`: soft-prompt adversaries of
the current model join Eq. 8). Everything public is importable from here.

Beyond the paper (all off by default, so the stage is the paper's unless a spec asks):
- `repel` γ: Eq. 8's safe target f_safe + γ (f_safe − f_unsafe) = ε∅ + β(ε_s − ε∅) + γβ(ε_s − ε_m). Eq. 8's hinge
  stops just past the bisector of f_safe and f_unsafe, so the model lands where the SAFE prompt would draw, and a
  safe prompt the model itself often draws as the concept keeps that rate; γ moves the target (and the bisector)
  further from the concept, ESD's negative guidance on top of Eq. 7.
- `cond_preserve` N: Eq. 9 keeps only the unconditional prediction. Stage V's layers also carry every other prompt,
  and pushing harder (a larger γ or lr) costs the things a spec preserves (the other colours). N points on the
  ORIGINAL model's guided trajectories of the spec's preservation prompts c^p (cached like the unconditional ones,
  `trajectories.cond_trajectories`) add ||ε_θ'(z^p, c^p, t) − ε(z^p, c^p, t)||² to L_preserve, `preserve_batch`
  points per concept sample, weighted by the same λ.
- `params`: the trained groups (default "visual", the paper's). Under hardening the paper's group changes where the
  image attends, not what a conditioning's values become downstream; "visual+non-cross-attn" also trains the
  ResNets, feed-forwards and projections (never stage T's to_k / to_v), where an adversarial conditioning's concept
  turns into pixels (docs/robustness.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from trce.edit import Edit
from trce.errors import TrceError
from trce.families import family_of
from trce.methods.stage_v_config import METHOD, MixedPrecision, StageVConfig, settings_record
from trce.methods.stage_v_hardening import Hardening, adversary_draws, original_pipeline, round_steps
from trce.methods.stage_v_loss import named_losses, repelled_safe, stage_v_loss, triplet_loss
from trce.methods.stage_v_train import (
    EpochPlan,
    cond_draws,
    epoch_plan,
    make_accelerator,
    run_key,
    train,
    trainable_parameters,
)
from trce.methods.training import Checkpoints
from trce.methods.trajectories import Reference, concept_trajectories, cond_trajectories, uncond_trajectories
from trce.registry import Context

# the stage's public names, wherever they live (the registry's entry points are `run` and `StageVConfig`)
__all__ = [
    "METHOD", "EpochPlan", "Hardening", "MixedPrecision", "StageVConfig", "adversary_draws", "cond_draws", "epoch_plan",
    "erase_v", "original_pipeline", "repelled_safe", "round_steps", "run", "settings_record", "stage_v_loss",
    "trainable_parameters", "triplet_loss",
]

log = logging.getLogger(__name__)

_DEFAULT_CONFIG = StageVConfig()  # erase_v's default: the paper's settings


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _curve(losses: list[list[float]], points: int = 100) -> list[list[float]]:
    if len(losses) <= points:
        return losses
    idx = sorted({round(i * (len(losses) - 1) / (points - 1)) for i in range(points)})
    return [losses[i] for i in idx]


def _mean_rows(rows: list[list[float]]) -> list[float]:
    return [sum(col) / len(col) for col in zip(*rows)]


# --------------------------------------------------------------------------- the stage
def erase_v(
    pipe,
    pairs: Sequence[tuple[str, str]],
    config: StageVConfig = _DEFAULT_CONFIG,
    *,
    reference=None,
    cache_dir: str | Path | None = None,
    spec: dict | None = None,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    accelerator=None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    preserve_prompts: Sequence[str] = (),
) -> Edit:
    """Run TRCE stage V on `pipe` for the (malicious prompt, safe prompt) `pairs`; return the Edit.

    reference: the frozen ORIGINAL model (pipeline or UNet) that makes trajectories and targets.
        Pass it when `pipe` already carries stage T's edit; None uses `pipe` (TRCE(V) alone).
    cache_dir: where trajectory caches live (shared by every concept of a base model) and, unless
        `checkpoint_dir` is given, where checkpoints go (`stage-v-runs/<run key>`). None: no disk.
    checkpoint_dir: checkpoints of this run; a rerun with the same inputs resumes from the last one.
    accelerator: an `accelerate.Accelerator` to use (default: one made for `config`). Under
        `accelerate launch` (torchrun path: `--multi_gpu --num_processes N`) load `pipe` on
        `accelerate.PartialState().device` in every process; for CPU processes create
        `PartialState(cpu=True)` first (accelerate fixes its process state on first use).
    on_step(step, losses): called in every process after each optimizer step (and its checkpoint).
    preserve_prompts: prompts whose conditional predictions `cond_preserve` keeps (the spec's preservation prompts).
    """
    pairs = [(str(m), str(s)) for m, s in pairs]
    if not pairs:
        raise TrceError("stage V needs at least one (malicious prompt, safe prompt) pair")
    t_start = time.perf_counter()
    family = family_of(pipe)
    acc, mp = make_accelerator(config, family.denoiser(pipe).device, accelerator)
    device = acc.device
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
    ref = Reference.from_pipe(pipe, reference, autocast_dtype=autocast_dtype)
    cache_dir = Path(cache_dir) if cache_dir is not None else None

    # 1. trajectories and reference targets (Eq. 6, 7, 9), computed once, batched, cached.
    concept = concept_trajectories(
        ref, pairs, config.n_trajectories, steps=config.ddim_steps, keep=config.keep_steps,
        guidance=config.sample_guidance, beta=config.beta, image_size=config.image_size, seed=config.seed,
        batch_size=config.cache_batch_size, cache_dir=cache_dir, dist=acc, progress=progress)
    t_concept = _sync(ref.device)
    uncond = uncond_trajectories(
        ref, config.n_uncond, steps=config.ddim_steps, image_size=config.image_size, seed=config.uncond_seed,
        batch_size=config.cache_batch_size, cache_dir=cache_dir, dist=acc, progress=progress)
    cond = None
    if config.cond_preserve:
        cond = cond_trajectories(
            ref, list(preserve_prompts), config.cond_preserve, steps=config.ddim_steps,
            guidance=config.sample_guidance, image_size=config.image_size, seed=config.uncond_seed,
            batch_size=config.cache_batch_size, cache_dir=cache_dir, dist=acc, progress=progress)
    t_cache = _sync(ref.device)

    # 2. training: only the trainable copy runs from here on.
    ckpt, key = None, None
    if config.checkpoint_every and (checkpoint_dir is not None or cache_dir is not None):
        key = run_key(config, pairs, ref, pipe, acc.num_processes, mp, cond)
        folder = Path(checkpoint_dir) if checkpoint_dir is not None else cache_dir / "stage-v-runs" / key[:16]
        ckpt = Checkpoints(folder, key, "stage V")
    weights, losses, resumed, robust = train(pipe, family, pairs, concept, uncond, config, acc, mp, ckpt, progress,
                                             on_step, ref, cond, list(preserve_prompts))
    t_end = _sync(device)

    info = {
        "steps": len(losses),
        "resumed_from_step": resumed,
        "loss_first": named_losses(losses[0]) if losses else None,
        "loss_last": named_losses(losses[-1]) if losses else None,
        "loss_first10_mean": named_losses(_mean_rows(losses[:10])) if losses else None,
        "loss_last10_mean": named_losses(_mean_rows(losses[-10:])) if losses else None,
        "loss_curve_columns": ["step", "total", "erase", "preserve", "active"],
        "loss_curve": _curve([[i + 1, *row] for i, row in enumerate(losses)]),
        "timings_s": {"cache_concept": round(t_concept - t_start, 3), "cache_uncond": round(t_cache - t_concept, 3),
                      "train": round(t_end - t_cache, 3), "total": round(t_end - t_start, 3)},
        "cache": {"concept": {"file": concept.path.name if concept.path else None, "key": concept.key},
                  "uncond": {"file": uncond.path.name if uncond.path else None, "key": uncond.key},
                  **({"cond": {"file": cond.path.name if cond.path else None, "key": cond.key}} if cond else {})},
        "reference": ref.fingerprint["id"],
        "device": str(device),
        "num_processes": acc.num_processes,
        "mixed_precision": mp,
        "keep_steps": config.keep_steps,
        "pairs": len(pairs),
        "trainable_tensors": len(weights),
        "trainable_parameters": sum(v.numel() for v in weights.values()),
        "run_key": key,
        **({"robust": robust} if robust is not None else {}),
    }
    log.info("stage V: %d steps, loss %s -> %s, %.1fs (cache %.1fs, train %.1fs)", len(losses),
             info["loss_first"], info["loss_last"], t_end - t_start, t_cache - t_start, t_end - t_cache)
    prefix = family.denoiser_name
    # method "trce", stage "V": reports name it "TRCE (V)" (the registry's entry, labelled by stage)
    return Edit(weights={f"{prefix}.{name}": t for name, t in weights.items()}, method="trce", spec=dict(spec or {}),
                settings={**settings_record(config), "stage": "V"}, base=ref.fingerprint, info=info)



def run(pipe, specs, config: StageVConfig, context: Context) -> Edit:
    """TRCE stage V (the registry's stage function): the specs' (malicious, safe) prompt pairs go to `erase_v`,
    with `context.reference` the original denoiser when stage T ran first. Trajectories are cached (and
    checkpoints kept) under `<cache>/stage-v` unless the context writes no cache."""
    from trce.concepts import preservation_prompts_of, spec_record
    from trce.methods.prior import cache_dir

    pairs = [(p.malicious, p.safe) for s in specs for p in s.pairs()]
    folder = cache_dir(context.cache_dir) / "stage-v" if context.use_cache else None
    keep = preservation_prompts_of(specs, context.data_dir) if config.cond_preserve else ()
    return erase_v(pipe, pairs, config, reference=context.reference, cache_dir=folder, spec=spec_record(specs),
                   progress=context.progress, checkpoint_dir=context.checkpoint_dir, preserve_prompts=keep)
