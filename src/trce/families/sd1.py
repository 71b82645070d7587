"""SD 1.x: one CLIP text encoder, a UNet with cross-attention, DDIM; ShapeWorld and `sd14-arch` are this family.

- Text enters the UNet only through cross-attention: every `attn2.to_k` / `attn2.to_v` reads the text
  encoder's last hidden state (N, 77, 768 for SD 1.4), so those are the layers stage T edits (Eq. 5).
- The tokenizer pads with end-of-text, so the [EoT] token and the padding are the same id (`trce.tokens`).
- Training groups: `visual` = every `attn1.*` and `attn2.to_q.*` (stage V, Sec. 4.2); `cross-attn` =
  every `attn2.*`; `non-cross-attn` = everything else but the time embedding and the output layers
  (ESD's "noxattn").
- KPOP's prompt sites: the cross-attention processors of the mid block, mid + up blocks, or all.
- Predictions are whatever the scheduler's `prediction_type` says (ε for SD 1.x; v-prediction
  checkpoints work the same way: methods compare predictions in the model's own parameterisation).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from trce.errors import TrceError, choose
from trce.families import GROUPS, ModelFamily

# stage V: self-attention (attn1, every parameter) and the query of cross-attention (attn2.to_q).
VISUAL = re.compile(r"(?:^|\.)attn1\.|(?:^|\.)attn2\.to_q\.")
# ESD's "noxattn" leaves these out too: the time embedding and the final output layers.
NON_CROSS_EXCLUDED = ("time_embedding.", "conv_norm_out.", "conv_out.")
SITES = {"mid": ("mid_block.",), "mid+up": ("mid_block.", "up_blocks."), "all": ("",)}


class SD1Family(ModelFamily):
    name = "sd1"
    description = "Stable Diffusion 1.x: CLIP ViT-L/14 text encoder, UNet with cross-attention (ShapeWorld, sd14-arch)"
    pipeline_classes = ("StableDiffusionPipeline",)
    denoiser_name = "unet"
    denoiser_classes = ("UNet2DConditionModel",)
    load_kwargs: ClassVar[dict] = {"safety_checker": None, "requires_safety_checker": False}

    def matches(self, pipe) -> bool:
        if type(pipe).__name__ in self.pipeline_classes:
            return True
        return (getattr(pipe, "unet", None) is not None and getattr(pipe, "text_encoder", None) is not None
                and getattr(pipe, "text_encoder_2", None) is None)

    def identity_modules(self, pipe) -> dict[str, torch.nn.Module]:
        return {"unet": pipe.unet, "text_encoder": pipe.text_encoder}

    # ------------------------------------------------------------------ text
    def tokenizer(self, pipe):
        return pipe.tokenizer

    def text_encoder(self, pipe) -> torch.nn.Module:
        return pipe.text_encoder

    def text_width(self, pipe) -> int:
        return int(pipe.text_encoder.config.hidden_size)

    def encode_ids(self, pipe, ids: torch.Tensor, slots: slice | None = None,
                   embeds: torch.Tensor | None = None) -> torch.Tensor:
        from trce.tokens import encode_with

        return encode_with(pipe.text_encoder, ids, slots, embeds)

    def token_states(self, pipe, prompts: Sequence[str], cut_at_eos: bool = False,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        from trce.tokens import encode, tokenize

        ids = tokenize(pipe.tokenizer, prompts)  # (N, L)
        return ids, encode(pipe.text_encoder, ids, pipe.tokenizer.eos_token_id if cut_at_eos else None)

    @torch.no_grad()
    def encode(self, pipe, prompts: Sequence[str]) -> torch.Tensor:
        return pipe.encode_prompt(list(prompts), pipe.text_encoder.device, 1, False)[0]

    def text_projections(self, pipe) -> list[str]:
        paths = [f"unet.{name}.{proj}.weight" for name, module in pipe.unet.named_modules() if name.endswith("attn2")
                 for proj in ("to_k", "to_v") if hasattr(module, proj)]
        if not paths:
            raise TrceError("the UNet has no cross-attention layers (attn2); is this a Stable Diffusion UNet?")
        return paths

    # ------------------------------------------------------------------ denoiser
    def predict(self, denoiser, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if params is None:
            return denoiser(z, t, encoder_hidden_states=cond).sample
        return torch.func.functional_call(denoiser, params, (z, t), {"encoder_hidden_states": cond}).sample

    def trainable(self, denoiser, group: str) -> dict[str, torch.nn.Parameter]:
        group = choose("parameter group", group, GROUPS)
        out = {}
        for name, param in denoiser.named_parameters():
            cross = ".attn2." in f".{name}"
            if group == "visual":
                keep = bool(VISUAL.search(name))
            elif group == "cross-attn":
                keep = cross
            else:
                keep = not cross and not name.startswith(NON_CROSS_EXCLUDED)
            if keep:
                out[name] = param
        if not out:
            raise TrceError(f"the UNet has no parameters in group {group!r}")
        return out

    def injection_layers(self, denoiser, sites: str) -> list[str]:
        sites = choose("prompt injection site", sites, SITES)
        names = []
        for key in denoiser.attn_processors:
            module = denoiser.get_submodule(key.removesuffix(".processor"))
            if getattr(module, "is_cross_attention", False) and key.startswith(SITES[sites]):
                names.append(key)
        if not names:
            raise TrceError(f"the UNet has no cross-attention layer at injection site {sites!r}; "
                            f"choose one of {', '.join(SITES)}")
        return names

    def latent_shape(self, pipe_or_denoiser, image_size: int | None = None, scale: int | None = None,
                     ) -> tuple[int, int, int]:
        unet = getattr(pipe_or_denoiser, "unet", pipe_or_denoiser)
        scale = scale if scale is not None else int(getattr(pipe_or_denoiser, "vae_scale_factor", 8))
        if image_size is None:
            side = int(unet.config.sample_size)
        else:
            if image_size <= 0 or image_size % scale:
                raise TrceError(f"image size {image_size} must be a positive multiple of {scale}")
            side = image_size // scale
        return int(unet.config.in_channels), side, side

    def sampler(self, scheduler_config: dict, steps: int, device=None):
        from diffusers import DDIMScheduler

        # A fresh DDIM from the model's scheduler configuration: the pipeline's own scheduler object
        # is never touched (set_timesteps mutates it).
        sched = DDIMScheduler.from_config(copy.deepcopy(dict(scheduler_config)))
        sched.set_timesteps(steps, device=device)
        return sched

    def noised(self, pipe, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sched = pipe.scheduler
        zt = sched.add_noise(z0, noise, t)
        kind = sched.config.get("prediction_type", "epsilon")
        if kind == "epsilon":
            return zt, noise
        if kind == "v_prediction":
            return zt, sched.get_velocity(z0, noise, t)
        if kind == "sample":
            return zt, z0
        raise TrceError(f"unsupported prediction type {kind!r}")

    # ------------------------------------------------------------------ drawing
    def pipeline_inputs(self, pipe, cond: torch.Tensor) -> dict[str, Any]:
        return {"prompt_embeds": cond.to(pipe.text_encoder.device, pipe.text_encoder.dtype)}

    def image_size(self, pipe) -> int:
        return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)

    def info(self, pipe) -> dict[str, Any]:
        return {
            "unet_sample_size": pipe.unet.config.sample_size,
            "image_size": self.image_size(pipe),
            "text_width": self.text_width(pipe),
            "max_tokens": pipe.tokenizer.model_max_length,
            "cross_attention_layers": sum(1 for n, _ in pipe.unet.named_modules() if n.endswith("attn2")),
            "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
        }
