"""SDXL: two CLIP text encoders, a UNet that reads their concatenated token states through cross-attention AND the
second encoder's pooled embedding (with the image-size ids) through `add_embedding`.

Text enters the UNet by two doors, and stage T closes both (`text_inputs`):
- tokens: every `attn2.to_k` / `attn2.to_v` reads the penultimate hidden states of both encoders, concatenated
  (768 + 1280 = 2048 wide in SDXL base). Token roles come from the first tokenizer; the second pads with "!"
  but puts the same content tokens at the same positions, so the [EoT] row of the concatenation is the [EoT] of
  both encoders.
- pooled: `add_embedding.linear_1` reads [pooled (1280); time-id features (6 x 256)]; its first 1280 input
  columns read the pooled embedding, which is the second encoder's projected [EoT] state: CLIP's summary of the
  prompt, exactly what TRCE maps. Eq. 5 applies to those columns alone (W[:, :1280] <- W[:, :1280] T), with T
  solved on the pooled vectors of the (malicious, safe) pairs and a preservation prior over the preservation
  prompts' pooled vectors.

Conditioning. `encode` packs one prompt into one (L + 1, D) matrix so that methods can treat conditionings as plain
tensors: rows 0..L-1 are the token states, row L holds the pooled embedding in its first P entries and the six
time ids after them (D >= P + 6). `predict` and `pipeline_inputs` unpack it. Guidance's unconditional half is
what the pipeline uses: zeros (token states and pooled) when the pipeline's `force_zeros_for_empty_prompt` is set
(SDXL base), else the empty prompt encoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from trce.families import TextInput
from trce.families.sd1 import SD1Family

N_TIME_IDS = 6  # original size (2), crop top-left (2), target size (2)


class SDXLFamily(SD1Family):
    name = "sdxl"
    description = ("Stable Diffusion XL: two CLIP text encoders (token states concatenated, pooled embedding of the "
                   "second), UNet with cross-attention and the pooled path through add_embedding (sdxl-arch)")
    pipeline_classes = ("StableDiffusionXLPipeline",)
    load_kwargs: ClassVar[dict] = {}

    def matches(self, pipe) -> bool:
        return type(pipe).__name__ in self.pipeline_classes or (
            getattr(pipe, "unet", None) is not None and getattr(pipe, "text_encoder_2", None) is not None)

    def identity_modules(self, pipe) -> dict[str, torch.nn.Module]:
        return {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}

    # ------------------------------------------------------------------ text
    def text_width(self, pipe) -> int:
        return int(pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size)

    def text_encoders(self, pipe) -> list[torch.nn.Module]:
        return [pipe.text_encoder, pipe.text_encoder_2]

    def input_table(self, pipe) -> torch.Tensor:
        a = pipe.text_encoder.get_input_embeddings().weight
        b = pipe.text_encoder_2.get_input_embeddings().weight
        return torch.cat([a, b.to(a.device, a.dtype)], dim=1)  # (V, E1 + E2): the tokenizers share their vocabulary

    def encode_ids(self, pipe, ids: torch.Tensor, slots: slice | None = None,
                   embeds: torch.Tensor | None = None) -> torch.Tensor:
        from trce.tokens import first_eos, slot_embeddings

        te1, te2 = pipe.text_encoder, pipe.text_encoder_2
        e1 = te1.get_input_embeddings().weight.shape[1]
        ids2 = ids.clone()  # the second tokenizer pads with its own token after the end of text
        after = torch.arange(ids.shape[1])[None] > first_eos(ids, pipe.tokenizer.eos_token_id)[:, None]
        ids2[after] = pipe.tokenizer_2.pad_token_id
        with slot_embeddings(te1, slots, None if embeds is None else embeds[..., :e1]):
            h1 = te1(ids.to(te1.device), output_hidden_states=True).hidden_states[-2]
        with slot_embeddings(te2, slots, None if embeds is None else embeds[..., e1:]):
            out2 = te2(ids2.to(te2.device), output_hidden_states=True)
        hidden = torch.cat([h1, out2.hidden_states[-2].to(h1.device)], dim=-1)
        return self._pack(pipe, hidden, out2.text_embeds)

    def pooled_width(self, pipe_or_unet) -> int:
        unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
        return int(unet.config.projection_class_embeddings_input_dim
                   - N_TIME_IDS * unet.config.addition_time_embed_dim)

    def token_states(self, pipe, prompts: Sequence[str], cut_at_eos: bool = False,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        ids, hidden, _ = self.token_and_pooled_states(pipe, prompts, cut_at_eos)
        return ids, hidden

    @torch.no_grad()
    def token_and_pooled_states(self, pipe, prompts: Sequence[str], cut_at_eos: bool = False,
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # one pass of each encoder: the second's pooled vector is read at its end-of-text token, which a cut keeps
        from trce.tokens import first_eos, tokenize

        ids1, ids2 = tokenize(pipe.tokenizer, prompts), tokenize(pipe.tokenizer_2, prompts)  # (N, L) each
        if cut_at_eos:
            keep = int(first_eos(ids1, pipe.tokenizer.eos_token_id).max()) + 1
            ids1_run, ids2_run = ids1[:, :keep], ids2[:, :keep]
        else:
            ids1_run, ids2_run = ids1, ids2
        h1 = pipe.text_encoder(ids1_run.to(pipe.text_encoder.device), output_hidden_states=True).hidden_states[-2]
        out2 = pipe.text_encoder_2(ids2_run.to(pipe.text_encoder_2.device), output_hidden_states=True)
        hidden = torch.cat([h1, out2.hidden_states[-2].to(h1.device)], dim=-1)  # (N, L', D1 + D2)
        return ids1, hidden, out2.text_embeds  # ids (N, L), pooled (N, P)

    @torch.no_grad()
    def pooled_states(self, pipe, prompts: Sequence[str]) -> torch.Tensor:
        from trce.tokens import first_eos, tokenize

        ids2 = tokenize(pipe.tokenizer_2, prompts)  # (N, L)
        # CLIP's attention is causal and the pooled vector is read at the end-of-text token, so the positions after
        # the batch's last end-of-text change nothing: cut them (a prompt of 20 tokens runs 20 positions, not 77;
        # on sdxl-arch's 694M-parameter second encoder this was most of stage T's pooled-path time)
        keep = int(first_eos(ids2, pipe.tokenizer_2.eos_token_id).max()) + 1
        return pipe.text_encoder_2(ids2[:, :keep].to(pipe.text_encoder_2.device)).text_embeds  # (N, P)

    def text_inputs(self, pipe) -> list[TextInput]:
        p = self.pooled_width(pipe)
        return [TextInput("tokens", tuple(self.text_projections(pipe))),
                TextInput("pooled", ("unet.add_embedding.linear_1.weight",), (0, p))]

    def _time_ids(self, pipe, n: int) -> torch.Tensor:
        side = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
        return torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32).expand(n, -1)

    def _pack(self, pipe, hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        n, _, d = hidden.shape
        extra = torch.zeros(n, 1, d, dtype=hidden.dtype, device=hidden.device)
        p = pooled.shape[-1]
        extra[:, 0, :p] = pooled.to(hidden.dtype)
        extra[:, 0, p:p + N_TIME_IDS] = self._time_ids(pipe, n).to(hidden.device, hidden.dtype)
        return torch.cat([hidden, extra], dim=1)  # (N, L + 1, D)

    @torch.no_grad()
    def encode(self, pipe, prompts: Sequence[str]) -> torch.Tensor:
        embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), device=pipe.text_encoder.device,
                                                  num_images_per_prompt=1, do_classifier_free_guidance=False)
        return self._pack(pipe, embeds, pooled)

    def token_part(self, cond: torch.Tensor) -> torch.Tensor:
        return cond[:, :-1]

    @torch.no_grad()
    def unconditional(self, pipe) -> torch.Tensor:
        if getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            cond = self.encode(pipe, [""])
            zero = torch.zeros_like(cond)
            zero[:, -1, self.pooled_width(pipe):] = cond[:, -1, self.pooled_width(pipe):]  # keep the time ids
            return zero
        return self.encode(pipe, [""])

    # ------------------------------------------------------------------ denoiser
    def _unpack(self, denoiser, cond: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p = self.pooled_width(denoiser)
        extra = cond[:, -1]
        return cond[:, :-1], {"text_embeds": extra[:, :p], "time_ids": extra[:, p:p + N_TIME_IDS]}

    def predict(self, denoiser, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        hidden, added = self._unpack(denoiser, cond)
        kwargs = {"encoder_hidden_states": hidden, "added_cond_kwargs": added}
        if params is None:
            return denoiser(z, t, **kwargs).sample
        return torch.func.functional_call(denoiser, params, (z, t), kwargs).sample

    # ------------------------------------------------------------------ drawing
    def pipeline_inputs(self, pipe, cond: torch.Tensor) -> dict[str, Any]:
        hidden, added = self._unpack(pipe.unet, cond)
        dev, dt = pipe.text_encoder_2.device, pipe.text_encoder_2.dtype
        return {"prompt_embeds": hidden.to(dev, dt), "pooled_prompt_embeds": added["text_embeds"].to(dev, dt)}

    def info(self, pipe) -> dict[str, Any]:
        return {**super().info(pipe), "pooled_width": self.pooled_width(pipe),
                "text_widths": [pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size]}
