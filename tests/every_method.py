"""Shared by the per-family tests (test_sd2, test_sdxl): every method's settings on a tiny pipeline, and the weights a
method may edit."""

from __future__ import annotations

import torch

TINY = {
    "trce": {"V": {"n_trajectories": 2, "n_uncond": 4, "ddim_steps": 2, "epochs": 1}},
    "uce": {},
    "kpop": {"kpop": {"iterations": 2, "ddim_steps": 2, "latents": "current", "batch_size": 2}},
    "esd": {"esd": {"iterations": 2, "ddim_steps": 2, "latents": "current", "batch_size": 2}},
    "rece": {},
    "advunlearn": {"advunlearn": {"iterations": 2, "warmup": 0, "attack_steps": 1, "ddim_steps": 2,
                                  "latents": "current", "batch_size": 2, "preserve_batch": 2}},
}


def weights(pipe) -> dict[str, torch.Tensor]:
    """Every trainable component's weights by module path (the UNet and the text encoders: AdvUnlearn edits CLIP)."""
    return {f"{name}.{k}": v.clone() for name in ("unet", "text_encoder", "text_encoder_2")
            if getattr(pipe, name, None) is not None for k, v in getattr(pipe, name).state_dict().items()}
