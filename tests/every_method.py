"""Shared by the per-family tests (test_sd2, test_sdxl, test_sd3): every method's settings on a tiny pipeline, the
weights a method may edit, and the one-pass text states stage T reads."""

from __future__ import annotations

import torch

TINY = {
    "trce": {"V": {"n_trajectories": 2, "n_uncond": 4, "ddim_steps": 2, "epochs": 1}},
    "uce": {},
    "trce-key": {},
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


def assert_one_pass_states(fam, pipe) -> None:
    """`token_and_pooled_states` (one encoder pass, as stage T uses it) equals `token_states` and `pooled_states`."""
    prompts = ["a red circle", "a small blue square on the left"]
    for cut in (False, True):
        ids, states, vec = fam.token_and_pooled_states(pipe, prompts, cut)
        ids_alone, states_alone = fam.token_states(pipe, prompts, cut)
        assert torch.equal(ids, ids_alone) and torch.equal(states, states_alone)
        torch.testing.assert_close(vec, fam.pooled_states(pipe, prompts), rtol=1e-5, atol=1e-6)
