"""The pieces ShapeWorld's trainers share: `TrainConfig` (the settings of `trce shapeworld train`), the stage
names, the device, the learning-rate schedule, the denoiser training loop (the UNet's and the miniatures'), the
pixel scaling and the detector's check on fresh renders."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from trce.errors import TrceError
from trce.shapeworld import world
from trce.utils import io

log = logging.getLogger(__name__)

STAGES = ("pool", "clip", "vae", "detector", "cache", "unet", "export")


@dataclass
class TrainConfig:
    seed: int = 0
    pool_size: int = 80_000
    clip_steps: int = 700
    clip_batch: int = 256
    clip_lr: float = 5e-4
    # Weight of attribute-classification heads on the CLIP image and text embeddings, added to the
    # contrastive loss. Without them the 32x32 ViT could not tell a diamond from a cross, so the
    # contrastive loss never pushed the two words apart (pooled [EoT] cosine 0.998 in v1).
    clip_aux_weight: float = 1.0
    vae_steps: int = 1500
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    detector_steps: int = 800
    detector_batch: int = 128
    detector_lr: float = 2e-3
    captions_per_image: int = 2
    unet_steps: int = 5500
    unet_batch: int = 128
    unet_lr: float = 3e-4
    unet_warmup: int = 200
    unet_ema: float = 0.999
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    checkpoint_every: int = 250
    device: str = "auto"
    # A finished run folder whose CLIP and UNet weights initialise this run (fine-tuning instead of
    # training from scratch); pool, vae and detector are reused from it when their settings agree.
    warm_start: str = ""
    # "ATTRIBUTE=VALUE" (e.g. "color=red"): the UNet never sees an image showing it and starts from scratch even
    # with a warm start (a warm-started UNet has seen it). The retrained reference that machine unlearning judges
    # erasure against: what an attack recovers from a model that never knew the value is the attack's floor.
    exclude: str = ""
    extra: dict = field(default_factory=dict)

    @classmethod
    def tiny(cls, seed: int = 0) -> TrainConfig:
        """A minutes-long configuration for tests (results are not meant to be good)."""
        return cls(
            seed=seed, pool_size=256, clip_steps=3, clip_batch=32, vae_steps=3, vae_batch=16, detector_steps=3,
            detector_batch=32, captions_per_image=1, unet_steps=4, unet_batch=16, unet_warmup=2, checkpoint_every=2,
        )


def torch_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def denoiser_loop(model, ema, opt, loss_at, *, steps: int, lr: float, warmup: int, ema_decay: float, ckdir: Path,
                  model_file: str, checkpoint_every: int, desc: str) -> None:
    """The denoiser training loop of ShapeWorld's UNet and of its miniatures (`trce.shapeworld.miniatures`):
    `loss_at(step)` is the step's loss (its batch drawn from the step alone, so a resumed run draws the same);
    cosine lr with warmup, gradient clipping at 1, EMA weights, a checkpoint (model, EMA, optimizer; last.json
    written last: it makes the checkpoint count) every `checkpoint_every` steps and at the end, resumed from
    `ckdir` when one is there; a non-finite loss stops with the last checkpoint kept."""
    start = 0
    if (ckdir / "last.json").exists():
        meta = io.read_json(ckdir / "last.json")
        start = meta["step"]
        model.load_state_dict(io.load_tensors(ckdir / model_file))
        ema.load_state_dict(io.load_tensors(ckdir / "ema.safetensors"))
        io.load_optimizer_state(opt, io.load_tensors(ckdir / "opt.safetensors"), meta["opt"])
        log.info("resuming %s training at step %d", desc, start)
    bar = tqdm(range(start, steps), desc=desc, initial=start, total=steps, mininterval=2)
    losses: list[float] = []
    for step in bar:
        loss = loss_at(step)
        if not torch.isfinite(loss):
            raise TrceError(f"{desc} loss became {loss.item()} at step {step}; the last checkpoint is kept in {ckdir}")
        for grp in opt.param_groups:
            grp["lr"] = lr * cosine_lr(step, steps, warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 1 - decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            ckdir.mkdir(exist_ok=True)
            io.save_tensors(ckdir / model_file, model.state_dict())
            io.save_tensors(ckdir / "ema.safetensors", ema.state_dict())
            tensors, scalars = io.optimizer_state(opt)
            io.save_tensors(ckdir / "opt.safetensors", tensors)
            io.write_json(ckdir / "last.json", {"step": step + 1, "loss": float(np.mean(losses[-50:])),
                                                "opt": scalars})
            log.info("%s checkpoint at step %d (loss %.4f)", desc, step + 1, np.mean(losses[-50:]))


def to_float(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


@torch.no_grad()
def detector_accuracy(det, seed: int, n: int, device: torch.device) -> dict[str, float]:
    """Per-attribute accuracy of the classifier on `n` fresh renders."""
    rng = np.random.default_rng([seed, 12345])
    scenes = [world.sample_scene(rng) for _ in range(n)]
    x = (to_float(np.stack([world.render(s) for s in scenes]), device) + 1) / 2
    pred = det.predict(x)
    return {a: float(np.mean([p == s.attribute(a) for p, s in zip(pred[a], scenes)])) for a in world.ATTRIBUTES}

