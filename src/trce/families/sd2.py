"""SD 2.x: the SD 1.x layout with an OpenCLIP ViT-H text encoder (as diffusers' `CLIPTextModel`, 1024-d), a
tokenizer that pads with "!" instead of end-of-text, linear projections in the UNet's transformers, and either
epsilon or v-prediction (the 768-v checkpoints).

Everything the SD 1.x family does holds: text still enters only through every `attn2.to_k`/`to_v`, so stage T edits
the same layers; token roles come from the tokenizer (the first end-of-text token, wherever the padding starts,
and `eot-all` is that token and the "!" padding after it); and every method compares predictions in the model's
own parameterisation. That is consistent for v-prediction: with x_t fixed, v = (ε − √(1−ᾱ_t) x_t) / √ᾱ_t is an
affine function of ε, so every target the methods build — ESD/KPOP's ε(c_n) − η(ε(c_e) − ε(c_n)), stage V's
ε(∅) + β(ε(c) − ε(∅)) (Eq. 6-7) — is a combination whose weights sum to one and maps to the same combination of
v's; the squared distances of Eq. 8-9 are scaled by 1/ᾱ_t per timestep, which only reweights timesteps.
(`tests/test_sd2.py` checks the identity on a tiny v-prediction UNet.)
"""

from __future__ import annotations

from typing import Any

from trce.families.sd1 import SD1Family


class SD2Family(SD1Family):
    name = "sd2"
    description = ("Stable Diffusion 2.x: OpenCLIP ViT-H text encoder (1024-d, padding '!'), linear-projection "
                   "cross-attention, epsilon or v-prediction (sd2-arch)")

    def matches(self, pipe) -> bool:
        tok = getattr(pipe, "tokenizer", None)
        return (super().matches(pipe) and tok is not None and tok.pad_token_id is not None
                and tok.pad_token_id != tok.eos_token_id)

    def info(self, pipe) -> dict[str, Any]:
        return {**super().info(pipe), "padding_token": pipe.tokenizer.pad_token}
