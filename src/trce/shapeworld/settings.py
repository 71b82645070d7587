"""Every number of a ShapeWorld training in range before anything is made: what `trce shapeworld train`,
`trce.shapeworld.train.train` and `trce.shapeworld.miniatures.train_miniature` check first.

Fields are named as the `--flags` of `trce shapeworld train` (`unet_steps`, `unet_batch`, ...): the CLI turns
them into flags, and Python callers of the miniature trainer see which of its settings (`steps`, `batch`) is meant
from the message.
"""

from __future__ import annotations

import math
from dataclasses import fields

from trce.errors import TrceError, check_integer, check_seed

# field of a miniature's config -> the `trce shapeworld train` option it comes from
MINIATURE_OPTIONS = {"steps": "unet_steps", "batch": "unet_batch", "lr": "unet_lr"}
_COUNTS = {"pool_size": 1, "clip_steps": 0, "vae_steps": 1, "detector_steps": 1, "unet_steps": 1, "unet_batch": 1,
           "clip_batch": 1, "vae_batch": 1, "detector_batch": 1, "captions_per_image": 1, "checkpoint_every": 1,
           "unet_warmup": 0, "warmup": 0}
MAX_STEPS = 10_000_000  # any training steps: far beyond any ShapeWorld training (days on a GPU)
_WHY = {"clip_steps": " (0 keeps the initial or warm-start CLIP)"}
# finite and >= 0 (a learning rate of 0 is a run that changes nothing: the warm-start tests use it)
_WEIGHTS = ("clip_lr", "vae_lr", "detector_lr", "unet_lr", "clip_aux_weight", "vae_kl_weight")
_FRACTIONS = ("caption_dropout", "unet_ema", "ema")  # in [0, 1)


def check_training(cfg) -> None:
    """Refuse a `TrainConfig` or `MiniatureConfig` with a number out of range (one message naming the option), and
    a pool too small for a batch (a batch draws distinct images, or captions, from it)."""
    values = {MINIATURE_OPTIONS.get(f.name, f.name): getattr(cfg, f.name) for f in fields(cfg)}
    check_seed(values["seed"])
    for name, low in _COUNTS.items():
        if name in values:
            check_integer(values[name], name)
            if values[name] < low:
                raise TrceError(f"{name} must be at least {low}{_WHY.get(name, '')}, got {values[name]}", field=name)
    for name, value in values.items():
        if name.endswith("steps") and isinstance(value, int) and value > MAX_STEPS:
            raise TrceError(f"{name} must be at most {MAX_STEPS:,}, got {value:,} (the shipped model trains 5,500 "
                            "UNet steps)", field=name)
    for name in _WEIGHTS:
        if name in values and not (_finite(values[name]) and values[name] >= 0):
            raise TrceError(f"{name} must be a finite number >= 0, got {values[name]}", field=name)
    for name in _FRACTIONS:
        if name in values and not (_finite(values[name]) and 0 <= values[name] < 1):
            raise TrceError(f"{name} must be a number from 0 to below 1, got {values[name]}", field=name)
    if "min_snr_gamma" in values and not (_finite(values["min_snr_gamma"]) and values["min_snr_gamma"] > 0):
        raise TrceError(f"min_snr_gamma must be a finite number > 0, got {values['min_snr_gamma']}",
                        field="min_snr_gamma")
    pool, captions = values["pool_size"], values["captions_per_image"]
    batches = [("the CLIP batch", "clip_batch", pool, "clip_steps"), ("the VAE batch", "vae_batch", pool, "vae_steps"),
               ("the detector batch", "detector_batch", pool, "detector_steps"),
               ("unet_batch", "unet_batch", pool * captions, "unet_steps")]
    for what, batch, population, steps in batches:
        if batch in values and values.get(steps) and values[batch] > population:
            need = -(-values[batch] // captions) if batch == "unet_batch" else values[batch]
            raise TrceError(f"pool_size {pool} is too small for {what} ({values[batch]}): a batch draws distinct "
                            f"images (captions) from the pool; use pool_size {need} or more", field="pool_size")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
