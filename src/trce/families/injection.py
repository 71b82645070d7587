"""The attention processors of prompt injection: a learnable prompt p joins the text that selected attention layers
read (KPOP; `concat` or `add`, cross-attention or the joint attention of an MMDiT). The equations, the sites and
what carries over to joint attention are in `trce.prompt_injection`, which installs these processors where the
model family says (`Family.injection_layers`, `Family.injection_processor`); nothing here knows a family.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from trce.errors import TrceError, choose

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
        through: the inner processor is that one (it says so: `collapses_repeated_row`) and the prompt leaves
        identical context rows identical (appended rows, or one vector added to every row; a position-wise added
        prompt would tell the 256 rows apart)."""
        prompt = self.slot.prompt
        return getattr(self.inner, "collapses_repeated_row", False) is True and (
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
