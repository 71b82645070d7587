"""A learnable prompt injected into cross-attention, through diffusers' attention processors.

KPOP (Bui et al., Sec. 4.3, Table 1) gives selected cross-attention layers an extra memory: a prompt
p of m_p tokens x text width d. With the text embeddings C (b x m_c x d):

- `concat` (the paper's default, "concatenative"): K = W_k [C; p], V = W_v [C; p], i.e. the m_p
  prompt tokens are appended to the m_c text tokens (the same p for every batch item, so
  classifier-free guidance batches get it on the conditional and unconditional halves alike).
  Any m_p >= 1 works. Appending copies of C itself leaves the output unchanged up to rounding
  (softmax over duplicated keys), which is why a prompt initialised from the text embeddings
  starts as a no-op.
- `add` ("additive"): K = W_k (C + p), V = W_v (C + p). p must have m_p = m_c (one vector per
  text token, added position by position) or m_p = 1 (one vector added to every token); any
  other m_p is refused with a `TrceError`. p = 0 leaves the output unchanged.

Sites (Table 6): `mid` (the middle block's cross-attention, the paper's default), `mid+up`, or
`all` cross-attention layers. Self-attention layers are never touched.

The processor wraps the layer's own processor object and only rewrites `encoder_hidden_states`
(and pads an attention mask, if any) before delegating, so no diffusers code is copied and any
attention backend keeps working. `injected(...)` installs the wrappers with
`set_attn_processor(dict)` and always puts the *original processor objects* back in `finally`.
With no prompt (`None`) the wrapper passes its arguments through untouched, so the output is
bit-identical to the original model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Literal, get_args

import torch

from trce.errors import TrceError, choose

log = logging.getLogger(__name__)

Mode = Literal["concat", "add"]
Sites = Literal["mid", "mid+up", "all"]
MODES: tuple[str, ...] = get_args(Mode)
SITES: tuple[str, ...] = get_args(Sites)


class PromptSlot:
    """The prompt shared by every injected layer; set `.prompt` to swap it (None: no injection)."""

    def __init__(self, prompt: torch.Tensor | None, mode: str):
        self.mode = choose("prompt injection mode", mode, MODES)
        self.prompt = prompt

    @property
    def prompt(self) -> torch.Tensor | None:
        return self._prompt

    @prompt.setter
    def prompt(self, value: torch.Tensor | None) -> None:
        if value is not None:
            if value.ndim != 2:
                raise TrceError(f"the injected prompt must be a (tokens, width) matrix, got shape {tuple(value.shape)}")
            if value.shape[0] < 1:
                raise TrceError("the injected prompt has no tokens")
        self._prompt = value


class PromptInjectionProcessor:
    """Wraps a cross-attention layer's processor: injects `slot.prompt` into the text side of K and V."""

    def __init__(self, inner, slot: PromptSlot, name: str = ""):
        self.inner = inner
        self.slot = slot
        self.name = name

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs):
        prompt = self.slot.prompt
        if prompt is not None and encoder_hidden_states is not None:
            encoder_hidden_states, attention_mask = inject(encoder_hidden_states, prompt, self.slot.mode,
                                                           attention_mask, where=self.name)
        if temb is not None:
            kwargs["temb"] = temb
        return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                          attention_mask=attention_mask, **kwargs)


def inject(context: torch.Tensor, prompt: torch.Tensor, mode: str, attention_mask: torch.Tensor | None = None,
           where: str = "") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text embeddings with the prompt injected (Table 1), and the attention mask that fits them.

    context: (b, m_c, d); prompt: (m_p, d). Returns (b, m_c + m_p, d) for `concat`, (b, m_c, d) for `add`.
    """
    b, m_c, d = context.shape
    if prompt.shape[-1] != d:
        raise TrceError(f"the injected prompt has width {prompt.shape[-1]} but the text embeddings at {where or 'this layer'} "
                        f"have width {d}")
    p = prompt.to(device=context.device, dtype=context.dtype)
    if mode == "concat":
        # cat(C, repeat(p, b)) along the token axis: (b, m_c + m_p, d)
        context = torch.cat([context, p.unsqueeze(0).expand(b, -1, -1)], dim=1)
        if attention_mask is not None:
            # the UNet hands cross-attention an additive bias (or a bool keep-mask) over the m_c text
            # tokens, shape (b, 1, m_c) or (b*heads, 1, m_c): the prompt tokens are always attended to
            keep = True if attention_mask.dtype == torch.bool else 0.0
            pad = attention_mask.new_full((*attention_mask.shape[:-1], p.shape[0]), keep)
            attention_mask = torch.cat([attention_mask, pad], dim=-1)
        return context, attention_mask
    if mode == "add":
        m_p = p.shape[0]
        if m_p not in (1, m_c):
            raise TrceError(f"an additive prompt needs 1 token or as many as the text ({m_c}), got {m_p} tokens")
        return context + p.unsqueeze(0), attention_mask  # (b, m_c, d) + (1, m_p, d), m_p in {1, m_c}
    raise TrceError(f"unknown prompt injection mode {mode!r}; available: {', '.join(MODES)}")


def _denoiser(pipe_or_denoiser):
    """(denoiser, family) of a pipeline or of a bare denoiser."""
    from trce.families import denoiser_family, family_of

    if isinstance(pipe_or_denoiser, torch.nn.Module):
        denoiser, family = pipe_or_denoiser, denoiser_family(pipe_or_denoiser)
    else:
        family = family_of(pipe_or_denoiser)
        denoiser = family.denoiser(pipe_or_denoiser)
    if not hasattr(denoiser, "attn_processors") or not hasattr(denoiser, "set_attn_processor"):
        raise TrceError(f"cannot inject a prompt into {type(pipe_or_denoiser).__name__}: it has no attention "
                        "processors")
    return denoiser, family


def site_layers(pipe_or_denoiser, sites: str = "mid") -> list[str]:
    """Names (as in `denoiser.attn_processors`) of the text-reading attention processors at `sites`
    (the model family says which they are)."""
    sites = choose("prompt injection site", sites, SITES)
    denoiser, family = _denoiser(pipe_or_denoiser)
    return family.injection_layers(denoiser, sites)


@contextlib.contextmanager
def injected(pipe_or_denoiser, prompt: torch.Tensor | None, mode: str = "concat", sites: str = "mid",
             ) -> Iterator[PromptSlot]:
    """Run the block with `prompt` injected at the cross-attention layers of `sites`.

    Yields the `PromptSlot`: setting `slot.prompt` (a tensor or None) changes the injected prompt
    without reinstalling. The original processor objects are restored on exit, even on error.
    """
    unet, _ = _denoiser(pipe_or_denoiser)
    slot = PromptSlot(prompt, mode)
    layers = set(site_layers(unet, sites))
    original = dict(unet.attn_processors)
    wrapped = {name: PromptInjectionProcessor(proc, slot, name) if name in layers else proc
               for name, proc in original.items()}
    unet.set_attn_processor(wrapped)  # a dict: every other layer keeps its own processor object
    log.debug("prompt injected (%s) at %d cross-attention layers: %s", slot.mode, len(layers), sorted(layers))
    try:
        yield slot
    finally:
        unet.set_attn_processor(dict(original))  # set_attn_processor pops from the dict it gets
