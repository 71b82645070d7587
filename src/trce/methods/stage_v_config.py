"""TRCE stage V's settings: `StageVConfig` (defaults are the paper's), their checks, and the record of them that the
Edit and the run key carry (`settings_record`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, get_args

from trce.errors import TrceError, choose_parts
from trce.families import GROUPS
from trce.methods.training import check_numbers

METHOD = "trce-v"  # the run key's name for this stage
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]
# Settings that change how a run is carried out but not its result: excluded from the run key so
# that a rerun with, say, another checkpoint interval still resumes.
OPERATIONAL = ("checkpoint_every", "cache_batch_size", "gradient_checkpointing")
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
    # hardening (`trce.methods.stage_v_hardening`): soft-prompt adversaries of the current model join Eq. 8
    robust: int = 0  # R rounds (0: plain stage V)
    robust_mix: float = 0.5  # ρ: chance that a concept sample takes an adversary of its pair (when it has one)
    robust_prompts: int = 16  # spec pairs attacked per round
    robust_tokens: int = 5  # soft vectors before the prompt
    robust_steps: int = 30  # Adam steps per soft prompt
    robust_samples: int = 4  # noisy latents in the attack's denoising objective
    robust_lr: float = 0.01
    robust_reference_steps: int = 20  # sampling steps of the original model's images the attack brings back
    robust_guidance: float = 7.5
    # beyond the paper: κ, weight of the consistency term (`stage_v_hardening`, 3.): a sample conditioned on
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


_DEFAULTS = asdict(StageVConfig())  # what an unset setting is (`settings_record`)


def settings_record(config: StageVConfig) -> dict:
    """The config as recorded: every field, the hardening ones only when it hardens (robust > 0), the settings beyond
    the paper only when they differ from their defaults (so the runs and checkpoints made before they existed keep
    their keys)."""
    return {k: v for k, v in asdict(config).items()
            if (config.robust or k not in _ROBUST) and (k not in _EXTRAS or v != _DEFAULTS[k])}
