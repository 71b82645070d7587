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

Faults and scale: the same code path runs in one process or under `accelerate launch` (data
parallel: each process takes its slice of every global batch, gradients are averaged). Batch order
is a pure function of (seed, epoch), so a run killed at any point and rerun resumes from its last
checkpoint (trainable tensors + Adam state, safetensors; step and losses in JSON, written last,
folder renamed atomically) and ends bit for bit where an uninterrupted run ends (CPU, same seed).
A non-finite loss stops every process with a `TrceError`; the last good checkpoint is kept.

Beyond the paper (all off by default, so the stage is the paper's unless a spec asks):
- `repel` γ: Eq. 8's safe target f_safe + γ (f_safe − f_unsafe) = ε∅ + β(ε_s − ε∅) + γβ(ε_s − ε_m). Eq. 8's hinge
  stops just past the bisector of f_safe and f_unsafe, so the model lands where the SAFE prompt would draw, and a
  safe prompt the model itself often draws as the concept (ShapeWorld-DiT paints 17.5 % of colourless shapes red)
  keeps that rate; γ moves the target (and the bisector) further from the concept, ESD's negative guidance on top of
  Eq. 7.
- `cond_preserve` N: Eq. 9 keeps only the unconditional prediction. Stage V's layers also carry every other prompt,
  and pushing harder (a larger γ or lr) costs the things a spec preserves (the other colours). N points on the
  ORIGINAL model's guided trajectories of the spec's preservation prompts c^p (cached like the unconditional ones,
  `trajectories.cond_trajectories`) add ||ε_θ'(z^p, c^p, t) − ε(z^p, c^p, t)||² to L_preserve, `preserve_batch`
  points per concept sample, weighted by the same λ.
- `params`: the trained groups (default "visual", the paper's). Under hardening the paper's group changes where the
  image attends, not what a conditioning's values become downstream; "visual+non-cross-attn" also trains the
  ResNets, feed-forwards and projections (never stage T's to_k / to_v), where an adversarial conditioning's concept
  turns into pixels. (On ShapeWorld it held the typed attacks but not the soft prompt, and cost the other colours:
  docs/robustness.md.)

Hardened stage V (`robust=R`; `trce.erase(..., robust=R)` and `trce erase --robust R` harden T and V). Eq. 8 steers
the trajectories of the spec's prompts c^m. An attacker who chooses the text encoder's INPUT, a prefix δ of k free
vectors before the prompt, finds a conditioning c^adv = τ([δ; c^m]) that the edited model reads as the concept
again: a trajectory Eq. 8 never saw. Hardening puts those conditionings into the loss:

1. adversaries. Round r = 0..R-1 runs before optimizer step s_r = ⌊r·S/R⌋ of the run's S steps (round 0 before
   training) and attacks, for `robust_prompts` pairs p of the spec (a seeded draw per round among the pairs that
   have cached trajectories; never an evaluation suite's prompts), the CURRENT model θ_r: the pipeline with stage
   T's edit and the stage-V weights trained so far. The attack is the white-box soft prompt that hardens stage T
   (`trce.methods.robust.soft_attack`, UnlearnDiffAtk's Eq. 3 without projection):
       δ*_p = argmin_δ (1/S') Σ_s || ε_θr( √ᾱ_s z0_p + √(1−ᾱ_s) ε_s, τ([δ; c^m_p]), t_s ) − ε_s ||²,
   z0_p the ORIGINAL model's image of c^m_p. What joins the loss is the full conditioning
   c^adv_p = τ([δ*_p; c^m_p]) (L, D), the text encoder's output that the denoiser reads, made by the model family
   (`family.encode_ids`), so every architecture is hardened the same way.
2. the loss. Pair p's adversaries A_p (all rounds so far) join its plain conditioning at the SAME cached points:
   concept sample (n, k) of pair p is conditioned on c ~ U(A_p) with probability ρ (`robust_mix`) when A_p ≠ ∅,
   else on c^m_p, and
       L_erase(c) = max( ||ε_θ'(z_t^m, c, t) − f_safe||² − ||ε_θ'(z_t^m, c, t) − f_unsafe||² + α, 0 )   (Eq. 8)
   with z_t^m, f_safe and f_unsafe of the ORIGINAL model on c^m (Eq. 6, 7); the ∅ half of Eq. 8 and Eq. 9 are
   unchanged. Why those points and targets: the attack pulls ε_θ'(·, c^adv) towards the original's ε on noisy
   images of c^m, so the trajectory c^adv opens runs (up to the attack's residual) where the original's c^m
   trajectory runs, through z_t^m; what the erased model should predict there is what it should predict for c^m,
   f_safe, away from f_unsafe. So the loss closes the path the attack opened where that path lies, with no new
   sampling and no reference call in the loop. Altogether the min-max
       min_θ' E_(n,k) [ (1−ρ) L_erase(c^m) + ρ L_erase(c^adv(θ')) + L_erase(∅) ] / 2 + λ L_preserve       (Eq. 8, 9)
   solved by alternation: each round solves the inner problem for θ_r, and training minimises with the
   adversaries held fixed until the next round.

3. consistency (`robust_consistency` κ > 0, beyond the paper; TRADES' split of adversarial training into a plain
   loss and a consistency term, Zhang et al. 2019): Eq. 8's hinge is linear in ε̂ (its gradient is the constant
   2(f_unsafe − f_safe)), so it pushes an adversarial prediction along the same direction however close that
   prediction already is to the concept's. A sample conditioned on c^adv_p also pays
       κ ||ε_θ'(z_t^m, c^adv_p, t) − sg(ε_θ'(z_t^m, c^m_p, t))||²
   (sg: no gradient), the distance to what the model in training predicts for the plain prompt at the same point,
   which Eq. 8 already erases: the prefix the attack found should change nothing. One more forward pass (without
   gradient) per adversarial sample.

The mix is a pure function of (seed, epoch): its draws come from a generator of their own, so the batches are the
plain run's and robust=0 runs the very code of the unhardened stage (bit for bit). The adversaries found so far go
into every checkpoint (`adversaries.safetensors`, their records in `state.json`); a round is attacked through a
results file in the checkpoint folder (`adversaries/round-N-<digest of the attacked weights>/`), so a run killed
inside a round finishes that round's attack where it stopped, a file is reused only for the very weights it was
found against, and under `accelerate launch` the round's targets are split between the processes (which is why a
hardened run over several processes needs a checkpoint folder). `Edit.info["robust"]` records each round (step,
pairs, the attack's objective at its start, its end and for the plain prompt, the Eq. 8 hinge of the current model
under c^m and under the adversaries at the pairs' cached points, the share of samples trained on adversaries and
their hinge until the next round, seconds) and, under `final`, both hinges at every adversary after training.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, get_args

import torch
from tqdm.auto import tqdm

from trce.edit import Edit
from trce.errors import TrceError, choose_parts
from trce.families import GROUPS, family_of
from trce.methods.training import Checkpoints, check_numbers, encode_prompts, finite_loss
from trce.methods.trajectories import (
    ConceptTrajectories,
    CondTrajectories,
    Reference,
    UncondTrajectories,
    concept_trajectories,
    cond_trajectories,
    mix_seed,
    uncond_trajectories,
)
from trce.registry import Context
from trce.utils import io

log = logging.getLogger(__name__)

METHOD = "trce-v"  # the run key's name for this stage
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]
# Settings that change how a run is carried out but not its result: excluded from the run key so
# that a rerun with, say, another checkpoint interval still resumes.
_OPERATIONAL = ("checkpoint_every", "cache_batch_size", "gradient_checkpointing")
# The hardening settings: recorded (and keyed) only when robust > 0, so that an unhardened run keeps the run key and
# the settings record of the stage without them (its checkpoints resume across the upgrade).
# Settings beyond the paper: recorded (and keyed) only when set, for the same reason.
_EXTRAS = ("repel", "cond_preserve", "params", "robust_consistency")
_ROBUST = ("robust", "robust_mix", "robust_prompts", "robust_tokens", "robust_steps", "robust_samples", "robust_lr",
           "robust_reference_steps", "robust_guidance")


@dataclass(frozen=True)
class StageVConfig:
    """Every setting of stage V; defaults are the paper's (Sec. 5, App. A.3)."""

    beta: float = 15.0  # guidance enhancement of the targets, Eq. 6/7 (Table 8: 10-20 work, 15 best)
    lambda_preserve: float = 100.0  # weight λ of Eq. 9
    margin: float = 0.01  # triplet margin, Eq. 8
    # γ, beyond the paper: the safe target of Eq. 8 pushed further from the unsafe one, f_safe + γ (f_safe − f_unsafe)
    # = ε∅ + β(ε_s − ε∅) + γβ(ε_s − ε_m), ESD's negative guidance on top of Eq. 7 (`repelled_safe`). 0: the paper.
    repel: float = 0.0
    # beyond the paper: points on the ORIGINAL model's guided trajectories of the spec's preservation prompts (other
    # colours, COCO captions), where the trained model must keep the original's CONDITIONAL prediction (Eq. 9 with
    # c^p in place of ∅), `preserve_batch` of them per concept sample beside the unconditional ones. 0: the paper.
    cond_preserve: int = 0
    # beyond the paper: the trained groups (`trce.families.GROUPS`, joined by "+"), e.g. "visual+non-cross-attn" adds
    # the ResNets, feed-forwards and projections after the cross-attention, where an adversarial conditioning's
    # colour becomes pixels. "visual" (the paper's attn1 + attn2.to_q) is recorded as unset.
    params: str = "visual"
    lr: float = 1e-6  # Adam learning rate
    epochs: int = 3
    n_trajectories: int = 100  # concept trajectories (the paper: 100 for one concept, 300 multi-concept)
    n_uncond: int = 2000  # unconditional points for Eq. 9, cached once per base model
    ddim_steps: int = 50  # DDIM steps of the cached trajectories
    keep_fraction: float = 0.5  # the noisy first part of the trajectory used for Eq. 8 (steps 0-24 of 50)
    # classifier-free guidance of the cached concept trajectories: the authors' 3 (ddgoodgood/TRCE
    # `stage2_data_preparation.py`, gen_image(guidance_scale=3)); the unconditional ones read "" either way
    sample_guidance: float = 3.0
    batch_size: int = 1  # concept samples per process and micro-batch
    preserve_batch: int = 4  # unconditional points per concept sample (the official code uses 4)
    grad_accum: int = 1  # micro-batches per optimizer step
    mixed_precision: MixedPrecision = "auto"  # autocast on GPU: auto = bf16 on GPU, fp32 ("no") on CPU
    checkpoint_every: int = 100  # optimizer steps between checkpoints (0: none)
    seed: int = 0  # concept trajectories and batch order
    uncond_seed: int = 0  # unconditional trajectories (kept apart so every concept reuses one cache)
    image_size: int | None = None  # pixels (square); None = the model's default
    cache_batch_size: int = 16  # concept trajectories per reference batch while caching
    gradient_checkpointing: bool = False  # trade compute for memory in the trained UNet
    # hardening (module doc, "Hardened stage V"): soft-prompt adversaries of the current model join Eq. 8
    robust: int = 0  # R rounds (0: plain stage V)
    robust_mix: float = 0.5  # ρ: chance that a concept sample takes an adversary of its pair (when it has one)
    robust_prompts: int = 16  # spec pairs attacked per round
    robust_tokens: int = 5  # soft vectors before the prompt
    robust_steps: int = 30  # Adam steps per soft prompt
    robust_samples: int = 4  # noisy latents in the attack's denoising objective
    robust_lr: float = 0.01
    robust_reference_steps: int = 20  # sampling steps of the original model's images the attack brings back
    robust_guidance: float = 7.5
    # beyond the paper: κ, weight of the consistency term (module doc, "Hardened stage V" 3.): a sample conditioned on
    # an adversary is also held to the model's own prediction for its plain prompt. 0: Eq. 8 alone.
    robust_consistency: float = 0.0

    def __post_init__(self) -> None:
        if self.mixed_precision not in get_args(MixedPrecision):
            raise TrceError(f"unknown mixed_precision {self.mixed_precision!r}; "
                            f"choose one of {', '.join(get_args(MixedPrecision))}")
        for name in ("epochs", "n_trajectories", "n_uncond", "ddim_steps", "batch_size", "grad_accum",
                     "cache_batch_size", "preserve_batch"):
            if int(getattr(self, name)) < 1:
                raise TrceError(f"stage V setting {name} must be at least 1, got {getattr(self, name)!r}")
        if not 0 < self.keep_fraction <= 1:
            raise TrceError(f"stage V keep_fraction must be in (0, 1], got {self.keep_fraction!r}")
        if not self.lr > 0:
            raise TrceError(f"stage V lr must be positive, got {self.lr!r}")
        for name in ("margin", "lambda_preserve", "checkpoint_every", "repel"):
            if getattr(self, name) < 0:
                raise TrceError(f"stage V setting {name} must not be negative, got {getattr(self, name)!r}")
        if self.image_size is not None and self.image_size < 8:
            raise TrceError(f"stage V image_size must be at least 8 pixels, got {self.image_size!r}")
        check_numbers(self, "stage V", integers=("robust_prompts", "robust_tokens", "robust_steps", "robust_samples",
                                                 "robust_reference_steps"),
                      non_negative_integers=("robust", "cond_preserve"), positive=("robust_lr", "robust_guidance"),
                      non_negative=("robust_consistency",))
        choose_parts("stage V parameter group", self.params, GROUPS)
        mix = self.robust_mix
        if isinstance(mix, bool) or not isinstance(mix, (int, float)) or not 0 <= mix <= 1:
            raise TrceError(f"stage V robust_mix must be a number in [0, 1], got {mix!r}")
        if self.robust_consistency and not self.robust:
            raise TrceError(f"stage V robust_consistency={self.robust_consistency!r} needs hardening (robust > 0): it acts on the "
                            "adversaries' samples")

    @property
    def keep_steps(self) -> int:
        """How many of the first DDIM steps feed Eq. 8 (25 of 50 by default)."""
        return max(1, int(self.ddim_steps * self.keep_fraction))


# --------------------------------------------------------------------------- the loss (Eq. 8, 9)
def repelled_safe(f_safe: torch.Tensor, f_unsafe: torch.Tensor, repel: float) -> torch.Tensor:
    """f_safe + γ (f_safe − f_unsafe): Eq. 7's target moved γ safe–unsafe gaps further from Eq. 6's.

    Why: Eq. 8's hinge is flat once ε̂ is `margin` closer to f_safe than to f_unsafe, so the trained model stops just
    past the bisector of the two. When the safe prompt itself still draws the concept now and then (a colour left
    unnamed that the model often paints red), landing near f_safe keeps that rate; moving the target away from
    f_unsafe moves the bisector, and the hinge then pushes ε̂ out of the concept's side (ESD's negative guidance,
    applied to TRCE's guided safe target).
    """
    return f_safe if not repel else f_safe + repel * (f_safe - f_unsafe)


def triplet_loss(pred: torch.Tensor, f_safe: torch.Tensor, f_unsafe: torch.Tensor, margin: float) -> torch.Tensor:
    """Eq. 8 per sample: max(||ε̂ − f_safe||² − ||ε̂ − f_unsafe||² + margin, 0), shape (B,).

    The squared norms are means over (C, h, w) ("mean-squared norms", as F.mse_loss), so the margin
    does not depend on the latent size.
    """
    d_safe = (pred - f_safe).pow(2).flatten(1).mean(1)  # (B,)
    d_unsafe = (pred - f_unsafe).pow(2).flatten(1).mean(1)  # (B,)
    return torch.relu(d_safe - d_unsafe + margin)


def stage_v_loss(pred_c: torch.Tensor, pred_u: torch.Tensor, pred_p: torch.Tensor, f_safe: torch.Tensor,
                 f_unsafe: torch.Tensor, target_p: torch.Tensor, *, margin: float, lambda_preserve: float,
                 pred_cp: torch.Tensor | None = None, target_cp: torch.Tensor | None = None,
                 pred_adv: torch.Tensor | None = None, target_adv: torch.Tensor | None = None,
                 consistency: float = 0.0) -> dict[str, torch.Tensor]:
    """L = ½(L_erase(ε̂(z,c^m,t)) + L_erase(ε̂(z,∅,t))) + λ·L_preserve.

    pred_c, pred_u: (B, C, h, w) predictions of the trained model at z_t^m with c^m and with ∅;
    pred_p: (B·U, C, h, w) at unconditional points, target_p their Eq. 9 targets. Eq. 8 is applied
    to both predictions and averaged (as the authors' code does); Eq. 9 is a plain MSE.
    pred_cp, target_cp (`cond_preserve`): (B·U, C, h, w) at points of preservation prompts' trajectories under their
    prompts, and the original's conditional predictions there; L_preserve is then the sum of the two MSEs.
    pred_adv, target_adv (`robust_consistency` κ): (A, C, h, w) the predictions of the A <= B samples conditioned on an
    adversary, and the model's own (detached) predictions there for their plain prompts; L_erase then also holds
    κ · Σ_a ||pred_adv − target_adv||² / B (mean-squared norms, averaged over the batch as the hinge is).
    """
    hinge_c = triplet_loss(pred_c, f_safe, f_unsafe, margin)
    hinge_u = triplet_loss(pred_u, f_safe, f_unsafe, margin)
    erase = 0.5 * (hinge_c.mean() + hinge_u.mean())
    if pred_adv is not None and len(pred_adv):
        erase = erase + consistency * (pred_adv - target_adv).pow(2).flatten(1).mean(1).sum() / pred_c.shape[0]
    preserve = (pred_p - target_p).pow(2).mean()
    if pred_cp is not None:
        preserve = preserve + (pred_cp - target_cp).pow(2).mean()
    active = ((hinge_c > 0).float().mean() + (hinge_u > 0).float().mean()) / 2
    return {"total": erase + lambda_preserve * preserve, "erase": erase, "preserve": preserve,
            "active": active.detach()}


def trainable_parameters(denoiser: torch.nn.Module, family, groups: str = "visual") -> dict[str, torch.nn.Parameter]:
    """The family's `visual` group (SD: every `attn1.*` and `attn2.to_q.*` parameter), or the union of the "+"-joined
    `groups`; freeze everything else."""
    chosen = {}
    for group in choose_parts("stage V parameter group", groups, GROUPS):
        chosen.update(family.trainable(denoiser, group))
    for name, param in denoiser.named_parameters():
        param.requires_grad_(name in chosen)
    stray = [n for n, p in denoiser.named_parameters() if p.requires_grad and n not in chosen]
    if stray:  # a tied or re-registered parameter would make this fire
        raise TrceError(f"stage V would also train {stray[:3]}; only the {groups} layers may change")
    return chosen


# --------------------------------------------------------------------------- batch order
@dataclass(frozen=True)
class EpochPlan:
    """Which samples each optimizer step uses: a pure function of (seed, epoch) and the sizes."""

    trajectory: torch.Tensor  # (S, A, W, B) index into the concept trajectories
    step: torch.Tensor  # (S, A, W, B) trajectory step in [0, keep)
    uncond: torch.Tensor  # (S, A, W, B·U) index into the unconditional points

    @property
    def steps(self) -> int:
        return self.trajectory.shape[0]


def epoch_plan(seed: int, epoch: int, n_trajectories: int, keep: int, n_uncond: int, *, batch_size: int,
               grad_accum: int, world: int, preserve_batch: int) -> EpochPlan:
    """Shuffle the trajectories (each once per epoch), draw a step uniform in [0, keep) for each and
    `preserve_batch` unconditional points per sample. The shuffled order is padded cyclically to a
    whole number of optimizer steps so that every process always has a full batch."""
    gen = torch.Generator("cpu").manual_seed(mix_seed("stage-v-plan", seed, epoch))
    per_step = batch_size * grad_accum * world
    steps = math.ceil(n_trajectories / per_step)
    order = torch.randperm(n_trajectories, generator=gen)
    order = order.repeat(math.ceil(steps * per_step / n_trajectories))[:steps * per_step]
    k = torch.randint(0, keep, (steps * per_step,), generator=gen)
    u = torch.randint(0, n_uncond, (steps * per_step, preserve_batch), generator=gen)
    shape = (steps, grad_accum, world, batch_size)
    return EpochPlan(trajectory=order.view(shape), step=k.view(shape),
                     uncond=u.view(steps, grad_accum, world, batch_size * preserve_batch))


# --------------------------------------------------------------------------- checkpoints
def _weights_digest(unet: torch.nn.Module) -> str:
    """A digest of the starting weights, so that a checkpoint resumes only the run it came from
    (stage T changes attn2.to_k/to_v, which the fingerprint's coarse probe may not see)."""
    with torch.no_grad():
        sums = [f"{float(p.sum(dtype=torch.float64)):.9e}/{float(p.abs().sum(dtype=torch.float64)):.9e}"
                for p in unet.parameters()]
    return hashlib.sha256("|".join(sums).encode()).hexdigest()


# --------------------------------------------------------------------------- helpers
def _accelerator(config: StageVConfig, device: torch.device, accelerator):
    mp = config.mixed_precision
    if mp == "auto":
        mp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if mp != "no" and device.type != "cuda":
        raise TrceError(f"mixed_precision {mp!r} needs a CUDA GPU; use 'no' (fp32) on the {device.type}")
    if accelerator is not None:
        if accelerator.mixed_precision != mp:
            raise TrceError(f"the accelerator passed to stage V uses mixed precision "
                            f"{accelerator.mixed_precision!r} but the config asks for {mp!r}")
        return accelerator, mp
    from accelerate import Accelerator

    try:
        return Accelerator(mixed_precision=mp, cpu=device.type == "cpu"), mp
    except ValueError as exc:  # accelerate's process-wide state was set up differently
        raise TrceError(f"cannot set up accelerate for stage V with mixed_precision={mp!r}: {exc}") from exc


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _curve(losses: list[list[float]], points: int = 100) -> list[list[float]]:
    if len(losses) <= points:
        return losses
    idx = sorted({round(i * (len(losses) - 1) / (points - 1)) for i in range(points)})
    return [losses[i] for i in idx]


# --------------------------------------------------------------------------- the stage
def erase_v(
    pipe,
    pairs: Sequence[tuple[str, str]],
    config: StageVConfig = StageVConfig(),
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
    acc, mp = _accelerator(config, family.denoiser(pipe).device, accelerator)
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
    ckpt, run_key = None, None
    if config.checkpoint_every and (checkpoint_dir is not None or cache_dir is not None):
        run_key = _run_key(config, pairs, ref, pipe, acc.num_processes, mp, cond)
        folder = Path(checkpoint_dir) if checkpoint_dir is not None else cache_dir / "stage-v-runs" / run_key[:16]
        ckpt = Checkpoints(folder, run_key, "stage V")
    weights, losses, resumed, robust = _train(pipe, family, pairs, concept, uncond, config, acc, mp, ckpt, progress,
                                              on_step, ref, cond, list(preserve_prompts))
    t_end = _sync(device)

    info = {
        "steps": len(losses),
        "resumed_from_step": resumed,
        "loss_first": _named(losses[0]) if losses else None,
        "loss_last": _named(losses[-1]) if losses else None,
        "loss_first10_mean": _named(_mean_rows(losses[:10])) if losses else None,
        "loss_last10_mean": _named(_mean_rows(losses[-10:])) if losses else None,
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
        "run_key": run_key,
        **({"robust": robust} if robust is not None else {}),
    }
    log.info("stage V: %d steps, loss %s -> %s, %.1fs (cache %.1fs, train %.1fs)", len(losses),
             info["loss_first"], info["loss_last"], t_end - t_start, t_cache - t_start, t_end - t_cache)
    prefix = family.denoiser_name
    # method "trce", stage "V": reports name it "TRCE (V)" (the registry's entry, labelled by stage)
    return Edit(weights={f"{prefix}.{name}": t for name, t in weights.items()}, method="trce", spec=dict(spec or {}),
                settings={**_settings(config), "stage": "V"}, base=ref.fingerprint, info=info)


_COLUMNS = ("total", "erase", "preserve", "active")


_DEFAULTS = asdict(StageVConfig())  # what an unset setting is (`_settings`)


def _named(row: Sequence[float]) -> dict[str, float]:
    return dict(zip(_COLUMNS, (float(v) for v in row)))


def _mean_rows(rows: list[list[float]]) -> list[float]:
    return [sum(col) / len(col) for col in zip(*rows)]


def _settings(config: StageVConfig) -> dict:
    """The config as recorded: every field, the hardening ones only when it hardens (robust > 0), the settings beyond
    the paper only when they differ from their defaults (so the runs and checkpoints made before they existed keep
    their keys)."""
    return {k: v for k, v in asdict(config).items()
            if (config.robust or k not in _ROBUST) and (k not in _EXTRAS or v != _DEFAULTS[k])}


def _run_key(config: StageVConfig, pairs, ref: Reference, pipe, world: int, mp: str, cond=None) -> str:
    settings = {k: v for k, v in _settings(config).items() if k not in _OPERATIONAL}
    payload = {"method": METHOD, "settings": settings, "mixed_precision": mp, "world": world,
               "pairs": pairs, "reference": ref.fingerprint["id"], "start": _weights_digest(family_of(pipe).denoiser(pipe))}
    if cond is not None:
        payload["cond"] = cond.key
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _train(pipe, family, pairs, concept: ConceptTrajectories, uncond: UncondTrajectories, config: StageVConfig,
           acc, mp: str, ckpt: Checkpoints | None, progress: bool, on_step, ref: Reference,
           cond: CondTrajectories | None = None, preserve_prompts: Sequence[str] = ()):
    device = acc.device
    rank, world = acc.process_index, acc.num_processes
    model = copy.deepcopy(family.denoiser(pipe)).to(device)
    if model.dtype != torch.float32:
        model = model.to(dtype=torch.float32)  # fp32 master weights: Adam steps of 1e-6 vanish in half precision
    model.train()
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    params = trainable_parameters(model, family, config.params)
    names = list(params)
    optimizer = torch.optim.Adam(list(params.values()), lr=config.lr)

    losses: list[list[float]] = []
    start, resumed, state, files = 0, None, None, {}
    found = ckpt.load() if ckpt is not None else None
    if found is not None:
        start, files, state, where = found
        saved, opt_tensors = files.get("params.safetensors", {}), files.get("optimizer.safetensors", {})
        if set(saved) != set(names):
            raise TrceError(f"checkpoint {where} holds other tensors than this denoiser trains; delete it")
        with torch.no_grad():
            for name in names:
                params[name].copy_(saved[name].to(device))
        io.load_optimizer_state(optimizer, {k: v.to(device) for k, v in opt_tensors.items()}, state["optimizer"])
        resumed, losses = start, [list(r) for r in state["losses"]]
    prepared, optimizer = acc.prepare(model, optimizer)
    if state is not None and acc.scaler is not None and state.get("scaler"):
        acc.scaler.load_state_dict(state["scaler"])
    optimizer.zero_grad(set_to_none=True)

    # Training data on the training device: cached latents, targets, text embeddings.
    lat, f_safe, f_unsafe = (x.to(device) for x in (concept.latents, concept.f_safe, concept.f_unsafe))
    f_safe = repelled_safe(f_safe, f_unsafe, config.repel)  # (N, K, C, h, w); the cache keeps Eq. 7's own
    t_concept, pair_index = concept.timesteps.to(device), concept.pair_index.to(device)
    u_lat, u_t, u_tgt = uncond.latents.to(device), uncond.timesteps.to(device), uncond.target.to(device)
    emb_m = encode_prompts(pipe, [m for m, _ in pairs], chunk=64, device=device)  # (P, L, D)
    emb_null = family.unconditional(pipe).to(device=device, dtype=torch.float32)  # (1, L, D)
    if cond is not None:  # the `cond_preserve` points, their prompts' conditionings and targets
        c_lat, c_t, c_tgt = cond.latents.to(device), cond.timesteps.to(device), cond.target.to(device)
        emb_p = encode_prompts(pipe, list(preserve_prompts), chunk=64, device=device)  # (P, L, D)
        c_prompt = cond.prompt_index.to(device)  # (N_c,)

    n_traj, keep = len(concept), concept.timesteps.shape[0]
    plan_args = {"batch_size": config.batch_size, "grad_accum": config.grad_accum, "world": world,
                 "preserve_batch": config.preserve_batch}
    per_epoch = epoch_plan(config.seed, 0, n_traj, keep, len(uncond), **plan_args).steps
    total = per_epoch * config.epochs
    hard = None
    if config.robust:
        hard = _Hardening(pipe, family, pairs, emb_m, (lat, t_concept, f_safe, f_unsafe, pair_index), config, ref,
                          acc, ckpt, total, progress)
        if state is not None:
            hard.load(files, state, where)
    bar = tqdm(total=total, initial=start, desc="stage V training", unit="step",
               disable=not (progress and acc.is_main_process), mininterval=1)
    plan, plan_epoch, draws = None, -1, None
    try:
        for step in range(start, total):
            if hard is not None:
                hard.rounds_due(step, params, model)  # the adversaries of the current model (round r at s_r)
            epoch, pos = divmod(step, per_epoch)
            if epoch != plan_epoch:
                plan, plan_epoch = epoch_plan(config.seed, epoch, n_traj, keep, len(uncond), **plan_args), epoch
                if hard is not None:
                    draws = adversary_draws(config.seed, epoch, tuple(plan.trajectory.shape))  # (2, S, A, W, B)
                if cond is not None:
                    cond_plan = cond_draws(config.seed, epoch, tuple(plan.uncond.shape), len(cond))  # (S, A, W, B·U)
            sums = torch.zeros(len(_COLUMNS), device=device)
            for micro in range(config.grad_accum):
                ti = plan.trajectory[pos, micro, rank].to(device)  # (B,)
                ki = plan.step[pos, micro, rank].to(device)  # (B,)
                ui = plan.uncond[pos, micro, rank].to(device)  # (B·U,)
                b, bu = ti.shape[0], ui.shape[0]
                z = lat[ti, ki]  # (B, C, h, w)
                x = torch.cat([z, z, u_lat[ui]])  # (2B + B·U, C, h, w): c^m, ∅ at z_t^m; ∅ at z^u
                t = torch.cat([t_concept[ki], t_concept[ki], u_t[ui]])
                if cond is not None:  # (+ B·U): c^p at z^p
                    ci = cond_plan[pos, micro, rank].to(device)
                    x, t = torch.cat([x, c_lat[ci]]), torch.cat([t, c_t[ci]])
                e_m = e_c = emb_m[pair_index[ti]]  # (B, L, D) c^m of each sample's pair
                took = None
                if hard is not None:  # c^adv of the pair instead, with probability robust_mix
                    e_c, took = hard.mix(e_m, pair_index[ti], draws[0, pos, micro, rank].to(device),
                                         draws[1, pos, micro, rank].to(device))
                e = torch.cat([e_c, emb_null.expand(b + bu, -1, -1), *([emb_p[c_prompt[ci]]] if cond is not None else [])])
                adv = {}
                if took is not None and config.robust_consistency and bool(took.any()):
                    # the consistency target: the model's own prediction for the plain prompt c^m at the adversarial
                    # samples' points (detached: only the adversarial prediction is pulled, module doc 3.)
                    with torch.no_grad(), acc.autocast():
                        plain = family.predict(prepared, z[took], t_concept[ki][took], e_m[took]).float()  # (A, C, h, w)
                    adv = {"target_adv": plain, "consistency": config.robust_consistency}
                sync = micro == config.grad_accum - 1
                with (acc.no_sync(prepared) if not sync else contextlib.nullcontext()):
                    with acc.autocast():
                        out = family.predict(prepared, x, t, e).float()
                    cp = {"pred_cp": out[2 * b + bu:], "target_cp": c_tgt[ci]} if cond is not None else {}
                    if adv:
                        cp.update(adv, pred_adv=out[:b][took])
                    parts = stage_v_loss(out[:b], out[b:2 * b], out[2 * b:2 * b + bu], f_safe[ti, ki],
                                         f_unsafe[ti, ki], u_tgt[ui], margin=config.margin,
                                         lambda_preserve=config.lambda_preserve, **cp)
                    values = acc.reduce(torch.stack([parts[c].detach() for c in _COLUMNS]), reduction="mean")
                    finite_loss(values[0], "stage V", step + 1, total, ckpt,
                                f"lower lr (now {config.lr:g}) or use mixed_precision='no'")
                    acc.backward(parts["total"] / config.grad_accum)
                if hard is not None:
                    hard.tally(took, triplet_loss(out[:b].detach(), f_safe[ti, ki], f_unsafe[ti, ki], config.margin))
                sums += values
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # every step (the authors' code never zeroed them)
            row = (sums / config.grad_accum).tolist()
            losses.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row[0]:.4g}", erase=f"{row[1]:.3g}", preserve=f"{row[2]:.3g}")
            done = step + 1
            if ckpt is not None and done % config.checkpoint_every == 0 and done < total and acc.is_main_process:
                    opt_tensors, opt_scalars = io.optimizer_state(optimizer)
                    ckpt_files = {"params.safetensors": {n: params[n] for n in names},
                                  "optimizer.safetensors": opt_tensors}
                    ckpt_state = {"optimizer": opt_scalars, "losses": losses,
                                  "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                                  "batch_order": "pure function of (seed, epoch): nothing else to restore"}
                    if hard is not None:  # the adversaries found so far: a resumed run trains on the very same
                        ckpt_files.update(hard.files())
                        ckpt_state["robust"] = hard.records
                    ckpt.save(done, ckpt_files, ckpt_state)
            if on_step is not None:
                on_step(done, _named(row))
    finally:
        bar.close()
    acc.wait_for_everyone()
    robust = hard.summary(model) if hard is not None else None
    weights = {n: params[n].detach().float().cpu().clone() for n in names}
    if ckpt is not None and acc.is_main_process:
        ckpt.finish()  # finished: the Edit holds the result
    return weights, losses, resumed, robust


# --------------------------------------------------------------------------- hardening (module doc)
def round_steps(rounds: int, total: int) -> list[int]:
    """s_r = ⌊r·S/R⌋: the optimizer step before which round r runs (round 0 before training)."""
    return [r * total // rounds for r in range(rounds)]


def cond_draws(seed: int, epoch: int, shape: tuple[int, ...], n: int) -> torch.Tensor:
    """`shape` indices into the `cond_preserve` points for an epoch's samples: a pure function of (seed, epoch), drawn
    apart from the batch plan, so that the plan (and a run without the term) is unchanged."""
    gen = torch.Generator("cpu").manual_seed(mix_seed("stage-v-cond", seed, epoch))
    return torch.randint(0, n, shape, generator=gen)


def adversary_draws(seed: int, epoch: int, shape: tuple[int, ...]) -> torch.Tensor:
    """(2, *shape) uniform [0, 1) draws of an epoch's concept samples: [0] decides whether a sample takes an adversary
    (< robust_mix), [1] which of its pair's. A pure function of (seed, epoch), apart from the batch plan's draws."""
    gen = torch.Generator("cpu").manual_seed(mix_seed("stage-v-adversary", seed, epoch))
    return torch.rand((2, *shape), generator=gen)


@contextlib.contextmanager
def _original(pipe, family, ref: Reference):
    """Within the block, a pipeline that draws as the ORIGINAL model: the reference pipeline, `pipe` itself (stage V
    alone), or `pipe` with the reference denoiser's tensors written over the ones an earlier stage changed."""
    if ref.encode_pipe is not pipe:
        yield ref.encode_pipe
        return
    own = family.denoiser(pipe)
    if ref.denoiser is own:
        yield pipe
        return
    mine = dict(own.named_parameters())
    theirs = dict(ref.denoiser.named_parameters())
    if set(mine) != set(theirs):
        raise TrceError("the stage V reference denoiser has other parameters than the pipeline's; pass the original "
                        "model of this pipeline")
    changed = {f"{family.denoiser_name}.{n}": p.detach() for n, p in theirs.items()
               if not torch.equal(p.detach().to(mine[n].device), mine[n].detach())}
    with Edit(weights=changed, method="original").applied(pipe, check_base=False):
        yield pipe


class _Hardening:
    """The adversaries of a hardened stage V run (module doc): when each round runs, the pool, the per-sample mix and
    the records. Every process holds the same pool (the attacks' results are shared through their files)."""

    def __init__(self, pipe, family, pairs, emb_m: torch.Tensor, data, config: StageVConfig, ref: Reference, acc,
                 ckpt: Checkpoints | None, total: int, progress: bool):
        from trce.methods.robust import pick_pairs

        self.pipe, self.family, self.config, self.ref, self.acc = pipe, family, config, ref, acc
        self.prompts = [m for m, _ in pairs]
        self.emb_m = emb_m  # (P, L, D) c^m
        self.lat, self.t, self.f_safe, self.f_unsafe, pair_index = data  # (N, K, C, h, w), (K,), ..., (N,)
        self.first: dict[int, int] = {}  # pair -> its first cached trajectory (where the hinges are measured)
        for n, p in enumerate(pair_index.tolist()):
            self.first.setdefault(p, n)
        present = sorted(self.first)  # pairs without a trajectory never reach Eq. 8: not attacked
        self.seed = mix_seed("stage-v-robust", config.seed)
        self.starts = round_steps(config.robust, total)
        self.picks = [[present[j] for j in pick_pairs(present, config.robust_prompts, self.seed, r)]
                      for r in range(config.robust)]
        self.folder = ckpt.folder / "adversaries" if ckpt is not None else None
        if self.folder is None and acc.num_processes > 1:
            raise TrceError(f"hardened stage V over {acc.num_processes} processes shares each round's adversaries "
                            "through its checkpoint folder; give it a cache or checkpoint folder and checkpoint_every "
                            "> 0, or set robust=0")
        self.progress = progress and acc.is_main_process
        self.cond = emb_m.new_zeros((0, *emb_m.shape[1:]))  # (N_adv, L, D) c^adv
        self.pair = torch.zeros(0, dtype=torch.long, device=emb_m.device)  # (N_adv,) the pair of each
        self.records: list[dict] = []
        self.reference: dict[int, torch.Tensor] | None = None  # pair -> the original model's latents of c^m
        self._index()

    # ------------------------------------------------------------------ the pool
    def _index(self) -> None:
        """count (P,) adversaries per pair and table (P, A_max) their rows in the pool (-1 past the count)."""
        n_pairs = self.emb_m.shape[0]
        self.count = torch.bincount(self.pair, minlength=n_pairs)  # (P,)
        table = torch.full((n_pairs, max(1, int(self.count.max()) if len(self.pair) else 1)), -1, dtype=torch.long)
        for p in range(n_pairs):
            rows = (self.pair == p).nonzero()[:, 0].cpu()
            table[p, :len(rows)] = rows
        self.table = table.to(self.pair.device)

    def mix(self, emb: torch.Tensor, pair: torch.Tensor, u_mix: torch.Tensor, u_pick: torch.Tensor,
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """emb (B, L, D) c^m of the samples' pairs `pair` (B,) -> the conditionings with an adversary of the pair
        where u_mix < robust_mix and the pair has one (u_pick picks which), and (B,) bool: where it took one."""
        count = self.count[pair]  # (B,)
        took = (u_mix < self.config.robust_mix) & (count > 0)
        if not bool(took.any()):
            return emb, took
        j = torch.minimum((u_pick * count).long(), (count - 1).clamp(min=0))  # (B,) uniform in [0, count)
        rows = self.table[pair, j].clamp(min=0)  # (B,) rows of the pool
        return torch.where(took[:, None, None], self.cond[rows], emb), took

    def tally(self, took: torch.Tensor, hinge: torch.Tensor) -> None:
        """Add a micro-batch's samples (all processes) to the latest round's training record: how many took an
        adversary, and the Eq. 8 hinge (B,) of those and of the plain ones."""
        took = took.float()
        sums = torch.stack([torch.tensor(float(len(took)), device=hinge.device), took.sum(),
                            (hinge * took).sum(), (hinge * (1 - took)).sum()])
        sums = self.acc.reduce(sums, reduction="sum").tolist()
        trained = self.records[-1]["trained"]
        for key, value in zip(("samples", "adversarial", "hinge_adversarial_sum", "hinge_plain_sum"), sums):
            trained[key] += value

    # ------------------------------------------------------------------ rounds
    def rounds_due(self, step: int, params: dict[str, torch.nn.Parameter], model: torch.nn.Module) -> None:
        """Run every round due before optimizer step `step` (s_r <= step) that has not run yet."""
        while len(self.records) < len(self.starts) and self.starts[len(self.records)] <= step:
            self._round(len(self.records), step, params, model)

    def _round(self, r: int, step: int, params: dict[str, torch.nn.Parameter], model: torch.nn.Module) -> None:
        from trce.methods.robust import reference_latents_for, soft_attack

        cfg = self.config
        t0 = time.perf_counter()
        picked = self.picks[r]
        if self.reference is None:  # the original's images of every round's prompts, once (seeded: a resume remakes them)
            every = sorted({i for pick in self.picks for i in pick})
            with _original(self.pipe, self.family, self.ref) as original:
                self.reference = reference_latents_for(original, self.prompts, every, cfg.seed,
                                                       cfg.robust_reference_steps, cfg.robust_guidance, cfg.image_size)
        # the CURRENT model: the pipeline (stage T applied) with the stage-V weights trained so far
        current = Edit(weights={f"{self.family.denoiser_name}.{n}": p.detach() for n, p in params.items()},
                       method="trce")
        results = None
        if self.folder is not None:  # keyed by the exact weights attacked: reused only for them
            results = self.folder / f"round-{r + 1}-{current.digest()['tensors'][:16]}" / "soft-prompt.jsonl"
        found = soft_attack(self.pipe, current, self.prompts, picked, tokens=cfg.robust_tokens,
                            steps=cfg.robust_steps, samples=cfg.robust_samples, lr=cfg.robust_lr,
                            seed=mix_seed("stage-v-adversary-round", self.seed, r) % 2**31, reference=self.reference,
                            progress=self.progress, results=results, size=cfg.image_size)
        cond = torch.stack([res.embeds["prompt_embeds"] for res in found]).to(self.emb_m)  # (n, L, D) c^adv
        if cond.shape[1:] != self.emb_m.shape[1:]:
            raise TrceError(f"the soft-prompt conditionings have shape {tuple(cond.shape[1:])}, the prompts' "
                            f"{tuple(self.emb_m.shape[1:])}: this model family's encode_ids and encode disagree")
        pair = torch.tensor(picked, dtype=torch.long, device=self.pair.device)  # (n,)
        plain, adversarial = self.hinges(model, cond, pair)
        self.cond, self.pair = torch.cat([self.cond, cond]), torch.cat([self.pair, pair])
        self._index()
        record = {
            "round": r + 1, "step": step, "pairs": list(picked), "adversaries": len(picked),
            "objective_start": _mean(res.objective_start for res in found),  # the attack's Eq. 3 at its start
            "objective": _mean(res.objective for res in found),  # ... at the adversary found
            "objective_plain": _mean(res.objective_plain for res in found),  # ... for the plain prompt
            "erase_plain": plain, "erase_adversarial": adversarial,  # Eq. 8 hinge of the current model
            "trained": {"samples": 0.0, "adversarial": 0.0, "hinge_adversarial_sum": 0.0, "hinge_plain_sum": 0.0},
            "seconds": round(time.perf_counter() - t0, 3),
        }
        log.info("stage V hardening round %d at step %d: %d adversaries, attack objective %.4g -> %.4g (plain %.4g), "
                 "Eq. 8 hinge plain %.4g, adversarial %.4g, %.1fs", r + 1, step, len(picked),
                 record["objective_start"], record["objective"], record["objective_plain"], plain, adversarial,
                 record["seconds"])
        self.records.append(record)

    @torch.no_grad()
    def hinges(self, model: torch.nn.Module, cond: torch.Tensor, pair: torch.Tensor) -> tuple[float, float]:
        """Mean Eq. 8 hinge of `model` under c^m and under the adversaries `cond` (n, L, D) of pairs `pair` (n,), at
        every cached step of each pair's first trajectory: how much of the erasure each adversary undoes."""
        keep = self.t.shape[0]
        chunk = max(1, self.config.cache_batch_size)
        plain, adversarial = [], []
        for c, p in zip(cond, pair.tolist()):
            n = self.first[p]
            for k0 in range(0, keep, chunk):
                ks = slice(k0, min(keep, k0 + chunk))
                z, t = self.lat[n, ks], self.t[ks]  # (k, C, h, w), (k,)
                e = torch.cat([self.emb_m[p].expand(len(z), -1, -1), c.expand(len(z), -1, -1)])  # (2k, L, D)
                with self.acc.autocast():
                    out = self.family.predict(model, torch.cat([z, z]), torch.cat([t, t]), e).float()
                fs, fu = self.f_safe[n, ks], self.f_unsafe[n, ks]
                h = triplet_loss(out, torch.cat([fs, fs]), torch.cat([fu, fu]), self.config.margin)  # (2k,)
                plain.append(h[:len(z)])
                adversarial.append(h[len(z):])
        return float(torch.cat(plain).mean()), float(torch.cat(adversarial).mean())

    # ------------------------------------------------------------------ checkpoints and records
    def files(self) -> dict[str, dict[str, torch.Tensor]]:
        if not len(self.pair):
            return {}
        return {"adversaries.safetensors": {"cond": self.cond, "pair": self.pair}}

    def load(self, files: dict, state: dict, where) -> None:
        records = state.get("robust")
        saved = files.get("adversaries.safetensors", {})
        n = sum(r["adversaries"] for r in records or [])
        if records is None or (n and set(saved) != {"cond", "pair"}) or (n and len(saved["pair"]) != n):
            raise TrceError(f"checkpoint {where} does not hold the adversaries of this hardened stage V run; delete it")
        self.records = [dict(r, trained=dict(r["trained"])) for r in records]
        if n:
            self.cond = saved["cond"].to(self.emb_m)
            self.pair = saved["pair"].to(self.pair.device)
        self._index()

    def summary(self, model: torch.nn.Module) -> dict:
        """Edit.info["robust"]: the rounds (training tallies as means) and both hinges at every adversary after
        training."""
        rounds = []
        for r in self.records:
            tr = r["trained"]
            adv, samples = tr["adversarial"], tr["samples"]
            trained = {"samples": int(samples), "adversarial_share": adv / samples if samples else None,
                       "erase_adversarial": tr["hinge_adversarial_sum"] / adv if adv else None,
                       "erase_plain": tr["hinge_plain_sum"] / (samples - adv) if samples > adv else None}
            rounds.append({**r, "trained": trained})
        final = None
        if len(self.pair):
            plain, adversarial = self.hinges(model, self.cond, self.pair)
            final = {"erase_plain": plain, "erase_adversarial": adversarial}
        return {"rounds": rounds, "adversaries": len(self.pair), "mix": self.config.robust_mix, "final": final,
                "attack": "soft"}


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else float("nan")


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
