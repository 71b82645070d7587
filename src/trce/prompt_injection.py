"""A learnable prompt injected into the attention layers that read text, through diffusers' attention processors.

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
`all` cross-attention layers. Self-attention layers are never touched. A stack of N joint blocks
(MMDiT) has no bottleneck; its sites are the middle joint block(s) (block (N-1)//2 through N//2: one
for odd N, two for even N), from there to the last block, or every joint block (`trce.families.sd3`).

The processor wraps the layer's own processor object and only rewrites `encoder_hidden_states`
(and pads an attention mask, if any) before delegating, so no diffusers code is copied and any
attention backend keeps working. `injected(...)` installs the wrappers with
`set_attn_processor(dict)` and always puts the *original processor objects* back in `finally`.
With no prompt (`None`) the wrapper passes its arguments through untouched, so the output is
bit-identical to the original model. The model family says which layers the sites are
(`injection_layers`), which wrapper they get (`injection_processor`) and the prompt's width d
(`injection_width`).

Joint attention (MMDiT: SD3, FLUX; `JointPromptInjectionProcessor`). There is no cross-attention:
a joint block's attention runs over one sequence of image rows X (b x n x d) and context rows C
(b x m_c x d, the text stream of that block, normalised and modulated: d is the block's inner
width, not the text encoder's), each stream with its own projections:

    Q = [W_q X; W'_q C],  K = [W_k X; W'_k C],  V = [W_v X; W'_v C],  O = softmax(Q K^T / sqrt(d_h)) V

and O splits back into the image rows (to_out) and the context rows (to_add_out). The prompt
enters as extra context rows, C -> [C; p] (`concat`: K, V and the context queries gain m_p rows),
and the m_p output rows of p are dropped, so the block's residual streams keep their shapes: p is
memory the block reads at that layer and nothing more. `add` is C -> C + p, as in cross-attention
(the context rows are the text, one per token); p = 0 is exactly the original.

What does NOT carry over from cross-attention: appending copies of C is no longer a no-op. Softmax
over n identical keys is one key at logit + log n; in cross-attention every key is text, so k extra
copies of all of C add log(k+1) to every logit and cancel, but here the image keys are not copied,
so every query's weight moves from the image keys to the text keys as if the text logits were
raised by log(k+1). That identity (k copies of C == the text logits + log(k+1)) is what holds and
is what the tests check; a concat prompt is never an exact no-op in joint attention.

Rotary positions (FLUX): the layer also gets `image_rotary_emb` = (cos, sin), each (m_c + n, D),
built from [txt_ids; img_ids] (text first); FLUX's txt_ids are all 0, i.e. the identity rotation
(cos 1, sin 0). The prompt rows get that same identity rotation, inserted after the text rows and
before the image rows, so a prompt row is positioned exactly like a text row. Layers without
rotary embeddings (SD3) need nothing.
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


class JointPromptInjectionProcessor(PromptInjectionProcessor):
    """Wraps a joint (MMDiT) attention layer's processor: `slot.prompt` joins the context rows (see the module doc).

    The signature is FluxAttention's positional order (attn, hidden_states, encoder_hidden_states,
    attention_mask, image_rotary_emb); SD3's Attention passes keywords. Returns what the wrapped
    processor returns, with the context output cut back to the m_c rows it was given.
    """

    @property
    def collapses_rows(self) -> bool:
        """Whether SD3's collapsed zero rows (`trce.families.sd3.CollapsedRowsJointProcessor`, `repeated_row`) can pass
        through: the inner processor is that one and the prompt leaves identical context rows identical (appended
        rows, or one vector added to every row; a position-wise added prompt would tell the 256 rows apart)."""
        from trce.families.sd3 import CollapsedRowsJointProcessor

        prompt = self.slot.prompt
        return type(self.inner) is CollapsedRowsJointProcessor and (
            self.slot.mode == "concat" or prompt is None or prompt.shape[0] == 1)

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None, repeated_row=None, **kwargs):
        # repeated_row is named so that diffusers' Attention (which drops the keywords a processor does not name)
        # hands it over; the prompt rows are appended after the m_c text rows, so its index still holds
        prompt = self.slot.prompt
        if image_rotary_emb is not None:
            kwargs["image_rotary_emb"] = image_rotary_emb
        if repeated_row is not None:
            if not self.collapses_rows:
                raise TrceError(f"the joint attention layer {self.name or ''} cannot take collapsed context rows "
                                "under this prompt (a position-wise added prompt)")
            kwargs["repeated_row"] = repeated_row
        if prompt is None or encoder_hidden_states is None:  # pass through untouched: bit-identical
            return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask, **kwargs)
        m_c = encoder_hidden_states.shape[1]
        if self.slot.mode == "add":  # C + p: same rows, same positions
            context, _ = inject(encoder_hidden_states, prompt, "add", where=self.name)  # (b, m_c, d)
            return self.inner(attn, hidden_states, encoder_hidden_states=context, attention_mask=attention_mask,
                              **kwargs)
        if attention_mask is not None:
            raise TrceError(f"the joint attention layer {self.name or ''} got an attention mask over its joint "
                            "sequence; injecting a concatenated prompt under a mask is not supported (use mode 'add')")
        context, _ = inject(encoder_hidden_states, prompt, "concat", where=self.name)  # (b, m_c + m_p, d)
        if image_rotary_emb is not None:
            kwargs["image_rotary_emb"] = identity_rotary_rows(image_rotary_emb, m_c, context.shape[1] - m_c, self.name)
        out = self.inner(attn, hidden_states, encoder_hidden_states=context, attention_mask=attention_mask, **kwargs)
        if not isinstance(out, tuple) or len(out) < 2:
            raise TrceError(f"the attention processor at {self.name or 'a joint layer'} "
                            f"({type(self.inner).__name__}) did not return (image, context) outputs")
        # (image (b, n, d), context (b, m_c + m_p, d)[, extra]): drop p's rows, the block's shapes stay
        return (out[0], out[1][:, :m_c], *out[2:])


def identity_rotary_rows(rotary, m_c: int, m_p: int, where: str = ""):
    """FLUX's rotary (cos, sin), each (..., m_c + n, D) with the text rows first, with m_p identity rows (cos 1,
    sin 0: position id 0, as FLUX's txt_ids) inserted after the m_c text rows: (..., m_c + m_p + n, D) each."""
    if not (isinstance(rotary, (tuple, list)) and len(rotary) == 2 and all(isinstance(r, torch.Tensor) for r in rotary)):
        raise TrceError(f"the joint attention layer {where} got rotary embeddings as {type(rotary).__name__}; "
                        "prompt injection knows FLUX's (cos, sin) pair only")
    out = []
    for table, fill in zip(rotary, (1.0, 0.0)):  # cos, sin
        rows = table.new_full((*table.shape[:-2], m_p, table.shape[-1]), fill)  # (..., m_p, D)
        out.append(torch.cat([table[..., :m_c, :], rows, table[..., m_c:, :]], dim=-2))  # (..., m_c + m_p + n, D)
    return tuple(out)


def inject(context: torch.Tensor, prompt: torch.Tensor, mode: str, attention_mask: torch.Tensor | None = None,
           where: str = "") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text embeddings with the prompt injected (Table 1), and the attention mask that fits them.

    context: (b, m_c, d); prompt: (m_p, d). Returns (b, m_c + m_p, d) for `concat`, (b, m_c, d) for `add`.
    """
    b, m_c, d = context.shape
    if prompt.shape[-1] != d:
        raise TrceError(f"the injected prompt has width {prompt.shape[-1]} but the context rows at "
                        f"{where or 'this layer'} have width {d}")
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
    """Run the block with `prompt` injected at the text-reading attention layers of `sites`.

    Yields the `PromptSlot`: setting `slot.prompt` (a tensor or None) changes the injected prompt
    without reinstalling. The original processor objects are restored on exit, even on error.
    """
    unet, family = _denoiser(pipe_or_denoiser)
    slot = PromptSlot(prompt, mode)
    layers = set(site_layers(unet, sites))
    original = dict(unet.attn_processors)
    wrapped = {name: family.injection_processor(proc, slot, name) if name in layers else proc
               for name, proc in original.items()}
    unet.set_attn_processor(wrapped)  # a dict: every other layer keeps its own processor object
    log.debug("prompt injected (%s) at %d attention layers: %s", slot.mode, len(layers), sorted(layers))
    try:
        yield slot
    finally:
        unet.set_attn_processor(dict(original))  # set_attn_processor pops from the dict it gets
