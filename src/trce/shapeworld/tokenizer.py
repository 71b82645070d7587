"""A CLIP BPE tokenizer whose vocabulary is generated from ShapeWorld's words.

The tokenizer is a plain `transformers.CLIPTokenizer` (byte-level BPE, `</w>` word ends, padding
with `<|endoftext|>` as SD v1 does). Every word of `vocab.yaml` and `language.yaml` becomes a single token through
merges built greedily; any other word still tokenizes, falling back to smaller pieces down to
single bytes, so multi-token words exist exactly as they do in real CLIP.
"""

from __future__ import annotations

import functools
import itertools
import re

from transformers import CLIPTokenizer

from trce.shapeworld.world import vocab

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_LENGTH = 32
_WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the lowest-ranked adjacent pair."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), None), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        best = min(pairs)[0]
        a, b = next((parts[i], parts[i + 1]) for r, i in pairs if r == best)
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and parts[i] == a and parts[i + 1] == b:
                merged.append(a + b)
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def build_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges) covering every ShapeWorld word, of the vocabulary and of the open language, as one token."""
    from trce.shapeworld.lexicon import language

    texts = [*vocab().all_text(), *language().all_text()]
    words = sorted({w for text in texts for w in _WORD.findall(text.lower()) if "{" not in w and "}" not in w})
    words = [w for w in words if w.isalpha()] + [w for w in words if not w.isalpha()]
    chars = list(_bytes_to_unicode().values())
    tokens: list[str] = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # Appending a merge with the highest rank never changes how earlier words tokenize: at
        # every step of their merging a lower-ranked pair was available.
        while len(parts := _bpe(word, ranks)) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
    tokens += [BOS, EOS]
    seen: dict[str, int] = {}
    for tok in tokens:
        seen.setdefault(tok, len(seen))
    return seen, merges


@functools.cache
def cached_tokenizer() -> CLIPTokenizer:
    """One shared `build_tokenizer()` (for counting tokens; do not modify it)."""
    return build_tokenizer()


def build_tokenizer() -> CLIPTokenizer:
    token_ids, merges = build_vocab()
    tok = CLIPTokenizer(vocab=token_ids, merges=merges, unk_token=EOS, bos_token=BOS, eos_token=EOS, pad_token=EOS)
    tok.model_max_length = MAX_LENGTH
    return tok
