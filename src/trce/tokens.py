"""Token roles: which text-encoder output positions an edit maps, found with the tokenizer only.

Roles (combine with `+`, e.g. `eot+key`):

- `sot`: the start-of-text token (position 0);
- `eot`: the first end-of-text token, the paper's choice (Sec. 4.1);
- `eot-all`: the first end-of-text token and every position after it (the padding; with SD v1's
  tokenizer the padding is end-of-text tokens, so these are exactly the eos positions);
- `key`: every token of the erased expression, multi-token words included: the span comes from
  tokenizing the prompt's prefix up to the expression and the prefix including it;
- `all`: every position (preservation sets only: the MACE/TRCE prior over all 77 tokens).

Pairs (malicious prompt, safe prompt) are aligned position by position:
`sot` <-> `sot`; `eot` <-> `eot`; `eot-all`: the j-th end-of-text position of the malicious prompt
<-> the j-th of the safe one, the last one when the safe prompt has fewer (both end at the last
position); `key`: each token of the expression <-> the *last* token of the safe target (in a
causal text encoder the last token of a phrase is the one that has read all of it), or, when
the target is empty ("a red circle" -> "a circle"), the token just before the slot.

Truncation: CLIP's tokenizer keeps an end-of-text token at the last position of a prompt that
fills the context, so `eot` is still found; an expression cut off by truncation has no `key`
tokens and its pair contributes nothing for that role (counted as dropped). A tokenizer that
truncates without an eos falls back to the last position for `eot`.

Free slots: `encode_with` / `slot_embeddings` run a text encoder with the token embeddings at some positions
replaced by given, differentiable vectors (the attacks' adversarial tokens, through each family's `encode_ids`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

import torch

from trce.errors import TrceError, choose_parts

log = logging.getLogger(__name__)

ROLES = ("sot", "eot", "eot-all", "key", "all")
PRESERVE_ROLES = ("sot", "eot", "eot-all", "all")


def parse_role(role: str, allowed: Sequence[str] = ROLES) -> tuple[str, ...]:
    """`"eot+key"` -> `("eot", "key")`, each part checked against `allowed` (a role named twice is refused)."""
    return choose_parts("token role", role, allowed)


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """(N, L) token ids, padded to and truncated at the tokenizer's context length."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def first_eos(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(N,) index of the first end-of-text token of each row (the last position if there is none)."""
    is_eos = ids == eos_id
    last = torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long)
    return torch.where(is_eos.any(1), is_eos.int().argmax(1), last)


def _bos_offset(tokenizer, ids_row: torch.Tensor) -> int:
    return 1 if tokenizer.bos_token_id is not None and int(ids_row[0]) == tokenizer.bos_token_id else 0


def _n_tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids if text.strip() else []


def token_span(tokenizer, text: str, span: tuple[int, int], ids_row: torch.Tensor) -> tuple[int, int]:
    """Token positions [start, end) in `ids_row` (the padded ids of `text`) of the characters `span`.

    Found by tokenizing `text[:start]` and `text[:end]` (BPE is stable at word boundaries); clipped
    to the content tokens when truncation cut the prompt. A zero-width `span` gives start == end.
    """
    offset = _bos_offset(tokenizer, ids_row)
    before = _n_tokens(tokenizer, text[: span[0]])
    upto = _n_tokens(tokenizer, text[: span[1]])
    full = ids_row.tolist()
    content_end = int(first_eos(ids_row[None], tokenizer.eos_token_id)[0])
    n_content = max(0, content_end - offset)
    if full[offset : offset + min(len(upto), n_content)] != upto[:n_content] or upto[: len(before)] != before:
        # The prefix did not tokenize the same alone (an expression glued to punctuation, say):
        # find the expression's own tokens in the prompt instead.
        piece = _n_tokens(tokenizer, text[span[0] : span[1]])
        for s in range(offset, content_end - len(piece) + 1):
            if piece and full[s : s + len(piece)] == piece:
                return s, s + len(piece)
        if not piece:
            return offset + len(before), offset + len(before)
        raise TrceError(f"cannot find the tokens of {text[span[0]:span[1]]!r} in the prompt {text!r}")
    start, end = offset + len(before), offset + len(upto)
    return min(start, content_end), min(end, content_end)


def role_positions(tokenizer, ids_row: torch.Tensor, parts: Sequence[str],
                   key_span: tuple[int, int] | None = None) -> list[int]:
    """Positions of a single prompt for the role `parts` (for preservation sets; `key` needs `key_span`)."""
    eos = int(first_eos(ids_row[None], tokenizer.eos_token_id)[0])
    length = ids_row.shape[0]
    out: list[int] = []
    for part in parts:
        if part == "sot":
            out.append(0)
        elif part == "eot":
            out.append(eos)
        elif part == "eot-all":
            out.extend(range(eos, length))
        elif part == "all":
            out.extend(range(length))
        elif part == "key":
            if key_span is None:
                raise TrceError("token role 'key' needs the expression's position (it applies to concept pairs only)")
            out.extend(range(*key_span))
    return list(dict.fromkeys(out))


def pair_positions(tokenizer, m_ids: torch.Tensor, s_ids: torch.Tensor, parts: Sequence[str],
                   m_span: tuple[int, int] | None = None, s_span: tuple[int, int] | None = None,
                   ) -> list[tuple[int, int]]:
    """Aligned (malicious position, safe position) pairs for one prompt pair (rules in the module doc).

    `m_span`/`s_span` are token spans (see `token_span`), needed for `key`.
    """
    m_eos = int(first_eos(m_ids[None], tokenizer.eos_token_id)[0])
    s_eos = int(first_eos(s_ids[None], tokenizer.eos_token_id)[0])
    length = m_ids.shape[0]
    out: list[tuple[int, int]] = []
    for part in parts:
        if part == "sot":
            out.append((0, 0))
        elif part == "eot":
            out.append((m_eos, s_eos))
        elif part == "eot-all":
            s_count = length - s_eos
            out.extend((m_eos + j, s_eos + min(j, s_count - 1)) for j in range(length - m_eos))
        elif part == "all":
            out.extend((p, p) for p in range(length))
        elif part == "key":
            if m_span is None or s_span is None:
                raise TrceError("token role 'key' needs the expression's position in both prompts")
            anchor = max(s_span[1] - 1, 0)  # last target token, or the token before an empty slot
            out.extend((p, anchor) for p in range(*m_span))
    return list(dict.fromkeys(out))


def needs_padding(parts: Sequence[str]) -> bool:
    """Whether a role reads positions after the first end-of-text token (the padding)."""
    return any(p in ("eot-all", "all") for p in parts)


@torch.no_grad()
def encode(text_encoder, ids: torch.Tensor, cut_at_eos: int | None = None) -> torch.Tensor:
    """(N, L) ids -> (N, L', D) text-encoder last hidden state (the embeddings SD cross-attends to).

    With `cut_at_eos` (the tokenizer's eos id) only the columns up to the batch's last first-[EoT]
    are run (L' <= L): CLIP's text encoder is causal with absolute positions, so every earlier
    position's output is the same as in the full-length run (up to float rounding), at a fraction
    of the cost. Only for roles that do not read the padding (see `needs_padding`).
    """
    if cut_at_eos is not None:
        ids = ids[:, : int(first_eos(ids, cut_at_eos).max()) + 1]
    return text_encoder(ids.to(text_encoder.device)).last_hidden_state


# --------------------------------------------------------------------------- free slots
@contextlib.contextmanager
def slot_embeddings(text_encoder, slots: slice | None, embeds: torch.Tensor | None) -> Iterator[None]:
    """Within the block, `text_encoder` reads `embeds` ((B or 1, k, E), differentiable) as the token embeddings at
    `slots` (a forward hook on the input-embedding layer, removed on exit)."""
    if embeds is None:
        yield
        return
    table = text_encoder.get_input_embeddings()
    # the embedding layers that read that table: T5's stack runs its own module tied to the shared one
    layers = [m for m in text_encoder.modules() if isinstance(m, torch.nn.Embedding) and m.weight is table.weight]

    def swap(module, args, out):  # out: (B, L, E) token embeddings, before position embeddings
        out = out.clone()
        out[:, slots] = embeds.to(out.dtype).expand(out.shape[0], -1, -1)
        return out

    handles = [m.register_forward_hook(swap) for m in layers or [table]]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def encode_with(text_encoder, ids: torch.Tensor, slots: slice | None = None,
                embeds: torch.Tensor | None = None) -> torch.Tensor:
    """(B, L) ids -> (B, L, D) last hidden state, with token embeddings at `slots` replaced by
    `embeds` ((B or 1, k, D), differentiable)."""
    with slot_embeddings(text_encoder, slots, embeds):
        return text_encoder(ids.to(text_encoder.device)).last_hidden_state
