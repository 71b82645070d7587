"""FLUX.1 (schnell and dev): a rectified-flow transformer with 19 joint (double-stream) and 38 single-stream
blocks, read by T5 (every token state) and CLIP-L (its pooled vector only).

How TRCE carries over (the paper's equations are in ../shared/papers/METHOD_NOTES.md):

Stage T. As in SD3 there is no cross-attention: T5's token states enter through ONE linear layer,
`transformer.context_embedder` (4096 -> 3072), and CLIP-L's pooled vector through
`transformer.time_text_embed.text_embedder.linear_1`; Eq. 5 (W' = W T, T mapping erase rows onto safe rows
under the preservation prior) applies to each. Which T5 rows: T5 is a bidirectional encoder without a causal
summary token, but its end-of-sequence token </s> attends to the whole prompt as every token does, and it sits
where CLIP's [EoT] sits in the token roles (`trce.tokens`: the first end-of-text of the role tokenizer, here
`tokenizer_2`). The "eot" role therefore maps the </s> row; because T5 spreads the concept over every position
(no causal mask hides the later ones), the "eot+key" role — the </s> row and the aligned concept span — is
the stronger edit on real FLUX, and "all" (every row up to </s>) the strongest. Padding rows are left out:
FluxPipeline attends to them, but they are the same for every prompt of a length and carry little of it.
T5 is encoded at the full context length, as the pipeline encodes it (no attention mask: the padding rows
see the prompt, so a shorter encoding would give other values).

Stage V. Trajectory steering on flow matching, as for SD3: velocities in place of ε in Eq. 6-8, the image
stream's attention of the joint blocks trained (`transformer_blocks.*.attn.to_q/to_k/to_v/to_out`; the
single-stream blocks read text and image with the same weights, so they stay frozen and the text path is
untouched), Euler flow steps with the pipeline's dynamic shift. FLUX.1-dev is guidance-distilled: one
forward pass with the guidance embedding g approximates classifier-free guidance at g. trce forms Eq. 6-7's
guided targets f_safe / f_unsafe with true classifier-free guidance over predictions made at embedded
guidance 1.0 (what FluxPipeline draws with `true_cfg_scale` and an empty negative prompt): both sides of the
triplet loss have the same form, so it compares like with like, and the unconditional half is a real
prediction. FLUX.1-schnell has no guidance embedding; the same formula applies.

Attacks optimise T5 tokens (the role tokenizer): the pooled CLIP vector follows the decoded text of the
candidate ids (discrete attacks), and is held at the decoded prompt while continuous slots change T5's
inputs only. ESD and UCE run unchanged.

KPOP. As for SD3 (`trce.families.sd3`: the prompt p joins the context rows of the joint attention,
C -> [C; p], its output rows dropped; width d = the context embedder's output, the inner width 3072, not
T5's 4096; initialised from LN(context_embedder(T5 rows)); sites over the 19 joint blocks, `mid` = block
9). FLUX's joint attention also rotates queries and keys by `image_rotary_emb`, built from
[txt_ids; img_ids], text first, txt_ids all 0 (identity rotation): the prompt rows get the identity
rotation too (position id 0), inserted after the text rows and before the image rows, so a prompt row
is positioned exactly like a text row (`trce.families.injection.identity_rotary_rows`).

The 38 single-stream blocks are never injected: they have no separate context stream (text and image rows
are one sequence through shared weights, and the model cuts the image rows out of it by the text's length
after the last block), so extra rows there would have to be carried through every later block. The prompt
reaches them only through what the joint blocks wrote into the image and text streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from trce.errors import TrceError, choose
from trce.families import GROUPS, ModelFamily
from trce.families.sd3 import FlowSampler, SD3Family


class FluxFamily(SD3Family):
    name = "flux"
    description = "FLUX.1 schnell / dev: double- and single-stream transformer, T5 tokens + CLIP-L pooled, flow matching"
    pipeline_classes = ("FluxPipeline",)
    denoiser_name = "transformer"
    denoiser_classes = ("FluxTransformer2DModel",)
    # the guidance embedding of every prediction a method makes on a guidance-distilled model (see the doc)
    embedded_guidance = 1.0

    def identity_modules(self, pipe) -> dict[str, torch.nn.Module]:
        return {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder,
                "text_encoder_2": pipe.text_encoder_2}

    # ------------------------------------------------------------------ text
    def tokenizer(self, pipe):
        return pipe.tokenizer_2  # T5: the token rows the context embedder reads

    def text_encoder(self, pipe) -> torch.nn.Module:
        return pipe.text_encoder_2

    def text_encoders(self, pipe) -> list[torch.nn.Module]:
        return [pipe.text_encoder, pipe.text_encoder_2]

    def _t5(self, pipe, ids: torch.Tensor, slots=None, embeds=None) -> torch.Tensor:
        from trce.tokens import slot_embeddings

        te = pipe.text_encoder_2
        with slot_embeddings(te, slots, embeds):
            return te(ids.to(te.device), output_hidden_states=False)[0]  # (N, L, 4096)

    def _pooled(self, pipe, texts: Sequence[str]) -> torch.Tensor:
        from trce.tokens import tokenize

        te = pipe.text_encoder
        ids = tokenize(pipe.tokenizer, texts)
        return te(ids.to(te.device), output_hidden_states=False).pooler_output  # (N, 768)

    @torch.no_grad()
    def token_states(self, pipe, prompts: Sequence[str], cut_at_eos: bool = False,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        from trce.tokens import tokenize

        ids = tokenize(pipe.tokenizer_2, prompts)  # full length always: T5 is bidirectional (see the doc)
        return ids, self._t5(pipe, ids)

    @torch.no_grad()
    def pooled_states(self, pipe, prompts: Sequence[str]) -> torch.Tensor:
        return self._pooled(pipe, list(prompts))

    # T5's token states and CLIP-L's pooled vector come from two different encoders: the interface's two passes,
    # not SD3's one
    token_and_pooled_states = ModelFamily.token_and_pooled_states

    @torch.no_grad()
    def encode(self, pipe, prompts: Sequence[str]) -> torch.Tensor:
        embeds, pooled, _ = pipe.encode_prompt(list(prompts), None, device=pipe.text_encoder_2.device,
                                               num_images_per_prompt=1,
                                               max_sequence_length=int(pipe.tokenizer_2.model_max_length))
        return self._pack(embeds, pooled)

    def encode_ids(self, pipe, ids: torch.Tensor, slots: slice | None = None,
                   embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self._t5(pipe, ids, slots, embeds)
        texts = pipe.tokenizer_2.batch_decode(ids, skip_special_tokens=True)
        with torch.no_grad():
            pooled = self._pooled(pipe, texts)
        return self._pack(hidden, pooled.to(hidden.device))

    def input_table(self, pipe) -> torch.Tensor:
        return pipe.text_encoder_2.get_input_embeddings().weight

    # ------------------------------------------------------------------ denoiser
    @staticmethod
    def _image_ids(h: int, w: int, device) -> torch.Tensor:
        """(h w, 3) positions of the packed latent patches, as FluxPipeline makes them."""
        ids = torch.zeros(h, w, 3, device=device)
        ids[..., 1] += torch.arange(h, device=device)[:, None]
        ids[..., 2] += torch.arange(w, device=device)[None, :]
        return ids.reshape(h * w, 3)

    def predict(self, denoiser, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        n, c, h, w = z.shape
        # (N, C, h, w) -> (N, h/2 w/2, 4C): 2x2 patches, the pipeline's packing
        packed = z.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), 4 * c)
        t = torch.as_tensor(t, device=z.device).reshape(-1).expand(n).to(z.dtype) / 1000  # the pipeline's scale
        guidance = None
        if denoiser.config.guidance_embeds:
            guidance = torch.full((n,), self.embedded_guidance, device=z.device, dtype=torch.float32)
        kwargs = {"hidden_states": packed, "timestep": t, "guidance": guidance,
                  "encoder_hidden_states": cond[:, :-1],
                  "pooled_projections": cond[:, -1, :self._pooled_width(denoiser)],
                  "txt_ids": torch.zeros(cond.shape[1] - 1, 3, device=z.device, dtype=z.dtype),
                  "img_ids": self._image_ids(h // 2, w // 2, z.device).to(z.dtype)}
        out = (denoiser(**kwargs) if params is None
               else torch.func.functional_call(denoiser, params, (), kwargs)).sample  # (N, h/2 w/2, 4C)
        return out.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)

    def trainable(self, denoiser, group: str) -> dict[str, torch.nn.Parameter]:
        group = choose("parameter group", group, GROUPS)
        image_attn = (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".attn.to_out.")
        text_attn = (".attn.add_q_proj.", ".attn.add_k_proj.", ".attn.add_v_proj.", ".attn.to_add_out.")
        single_text = (".attn.to_k.", ".attn.to_v.")  # single-stream keys/values read the text tokens too
        out = {}
        for name, param in denoiser.named_parameters():
            dotted = f".{name}"
            joint = name.startswith("transformer_blocks.")
            single = name.startswith("single_transformer_blocks.")
            reads_text = (joint and any(k in dotted for k in text_attn)) or (single and any(k in dotted for k in single_text))
            if group == "visual":
                keep = joint and any(k in dotted for k in image_attn)
            elif group == "cross-attn":
                keep = reads_text
            else:
                keep = (joint or single) and not reads_text
            if keep:
                out[name] = param
        if not out:
            raise TrceError(f"the transformer has no parameters in group {group!r}")
        return out

    def latent_shape(self, pipe_or_denoiser, image_size: int | None = None, scale: int | None = None,
                     ) -> tuple[int, int, int]:
        denoiser = getattr(pipe_or_denoiser, "transformer", pipe_or_denoiser)
        scale = scale if scale is not None else int(getattr(pipe_or_denoiser, "vae_scale_factor", 8))
        if image_size is None:
            if denoiser is pipe_or_denoiser:
                raise TrceError("a FLUX transformer has no native size of its own: give the image size")
            image_size = self.image_size(pipe_or_denoiser)
        if image_size <= 0 or image_size % (2 * scale):
            raise TrceError(f"image size {image_size} must be a positive multiple of {2 * scale} (2x2 latent patches)")
        side = image_size // scale
        return int(denoiser.config.in_channels) // 4, side, side

    def latents_out(self, pipe, latents: torch.Tensor, image_size: int | None = None) -> torch.Tensor:
        size = image_size or self.image_size(pipe)
        return pipe._unpack_latents(latents, size, size, pipe.vae_scale_factor)  # (N, h/2 w/2, 4C) -> (N, C, h, w)

    def sampler(self, scheduler_config: dict, steps: int, device=None):
        # The pipeline's schedule: sigmas 1 .. 1/steps, shifted by mu for the image's token count; mu is taken at
        # the largest count the scheduler knows (FLUX's native 1024 px: 4096 tokens, mu = max_shift).
        mu = float(scheduler_config.get("max_shift", 1.15)) if scheduler_config.get("use_dynamic_shifting") else None
        return FlowSampler(scheduler_config, steps, device, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)

    # ------------------------------------------------------------------ drawing
    def draw_kwargs(self, pipe) -> dict[str, Any]:
        return {}  # T5 is FLUX's token encoder: no zero rows to collapse

    def pipeline_inputs(self, pipe, cond: torch.Tensor) -> dict[str, Any]:
        dev, dt = pipe.text_encoder_2.device, pipe.text_encoder_2.dtype
        return {"prompt_embeds": cond[:, :-1].to(dev, dt),
                "pooled_prompt_embeds": cond[:, -1, :self._pooled_width(pipe.transformer)].to(dev, dt)}

    def image_size(self, pipe) -> int:
        return int(pipe.vae.config.sample_size)  # the autoencoder's native size (1024 for FLUX.1's)

    def info(self, pipe) -> dict[str, Any]:
        t = pipe.transformer.config
        return {"image_size": self.image_size(pipe), "text_width": self.text_width(pipe),
                "max_tokens": pipe.tokenizer_2.model_max_length, "joint_blocks": int(t.num_layers),
                "single_blocks": int(t.num_single_layers), "guidance_distilled": bool(t.guidance_embeds)}
