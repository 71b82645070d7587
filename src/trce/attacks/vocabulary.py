"""The real-token vocabulary of the typed attacks, and the concept words banned from it.

Real tokens. A typed adversarial prompt must be text a user can type that the model reads back as
the very tokens the attack chose. `real_tokens(tokenizer)` keeps the whole-word tokens (CLIP's
`...</w>`) whose decoded word re-tokenises, on its own, to exactly that one id; words joined by
spaces then re-tokenise to the same ids, because CLIP's pre-tokeniser splits on whitespace
before BPE. Sub-word pieces, special tokens and byte tokens that are not valid text on their own
and words with control characters are left out (an attack over them would find prompts nobody
can type back).

Banned words. The concept's own words (`Vocabulary(banned=...)`; see `shapeworld_banned` and
`spec_banned`) are removed from the candidate vocabulary, by exact word, case-insensitive: an attack that types
"red" to get red proves nothing. MMA-Diffusion's own filter is wider (every token that *contains* one of its
sensitive words or the concept's), and `trce.attacks.mma_text` applies it by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trce.errors import TrceError


def real_tokens(tokenizer, limit: int | None = None) -> dict[int, str]:
    """id -> word of every whole-word token that re-tokenises to itself alone (see the module doc).

    `limit`: ids at or above it are left out (the text encoder's embedding rows).
    """
    special = set(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()  # token -> id
    n = len(tokenizer) if limit is None else min(len(tokenizer), limit)
    cands = sorted(i for tok, i in vocab.items() if tok.endswith("</w>") and i < n and i not in special)
    words = [w.strip() for w in tokenizer.batch_decode([[i] for i in cands])]
    keep = [(i, w) for i, w in zip(cands, words) if w and w.isprintable() and not any(c.isspace() for c in w)]
    back = tokenizer([w for _, w in keep], add_special_tokens=False).input_ids
    return {i: w for (i, w), b in zip(keep, back) if list(b) == [i]}


@dataclass(frozen=True)
class Vocabulary:
    """The candidate tokens of an attack: real tokens minus the banned words.

    ids (A,) token ids; words their text; banned the words removed; index maps a token id to its
    row in `ids` (-1 where it is not a candidate).
    """

    ids: torch.Tensor
    words: tuple[str, ...]
    banned: tuple[str, ...]
    removed: tuple[str, ...]

    @classmethod
    def for_pipeline(cls, pipe, banned: Sequence[str] = (), substring: bool = False) -> Vocabulary:
        """The whole-word tokens the pipeline's text encoder has embeddings for, banned words removed."""
        from trce.families import family_of

        fam = family_of(pipe)
        return cls.build(fam.tokenizer(pipe), banned, limit=fam.input_table(pipe).shape[0], substring=substring)

    @classmethod
    def build(cls, tokenizer, banned: Sequence[str] = (), limit: int | None = None,
              substring: bool = False) -> Vocabulary:
        """The real tokens minus the banned ones: by exact word, case-insensitive; with `substring`, every token whose
        raw text (lowercased, `</w>` included) contains one of `banned` (MMA-Diffusion's rule)."""
        real = real_tokens(tokenizer, limit)
        if substring:
            subs = tuple(dict.fromkeys(w.lower() for w in banned if w))
            raw = dict(zip(real, tokenizer.convert_ids_to_tokens(list(real))))
            hit = {i for i in real if any(b in raw[i].lower() for b in subs)}
            ban = subs
        else:
            words = {w.strip().lower() for w in banned if w.strip()}
            hit = {i for i, w in real.items() if w.lower() in words}
            ban = tuple(sorted(words))
        keep = {i: w for i, w in real.items() if i not in hit}
        removed = tuple(sorted(real[i] for i in hit))
        if not keep:
            raise TrceError("no candidate tokens left: the tokenizer has no whole-word tokens outside the banned "
                            + (f"substrings {', '.join(map(repr, ban))}" if substring else "words"))
        ids = sorted(keep)
        return cls(ids=torch.tensor(ids, dtype=torch.long), words=tuple(keep[i] for i in ids), banned=ban,
                   removed=removed)

    def __len__(self) -> int:
        return len(self.words)

    def index(self, vocab_size: int) -> torch.Tensor:
        """(vocab_size,) row in `ids` of each token id, -1 for non-candidates."""
        out = torch.full((vocab_size,), -1, dtype=torch.long)
        out[self.ids] = torch.arange(len(self.ids))
        return out

    def text(self, rows: Sequence[int] | torch.Tensor) -> str:
        """The typed text of candidate rows (positions in `ids`), words joined by spaces."""
        return " ".join(self.words[int(r)] for r in rows)

    def sample(self, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
        """Uniformly random candidate rows of `shape`."""
        return torch.randint(len(self.ids), shape, generator=gen)


def shapeworld_banned(attribute: str, values: Sequence[str]) -> tuple[str, ...]:
    """A ShapeWorld concept's own words: each erased value's keyword and every synonym (spec and held out).

    Paraphrases are phrases of common words ("the color of blood") and are not banned word by word.
    """
    from trce.shapeworld import world

    v = world.vocab()
    words = set()
    for value in values:
        words.update(v.expressions(attribute, value, "keyword"))
        words.update(v.expressions(attribute, value, "synonym", "all"))
    return tuple(sorted(w.lower() for w in words))


def spec_banned(spec) -> tuple[str, ...]:
    """A concept spec's own words: every single-word expression (ShapeWorld specs: see `shapeworld_banned`)."""
    if spec.attribute is not None:
        return shapeworld_banned(spec.attribute, spec.values)
    return tuple(sorted({e.text.strip().lower() for e in spec.expressions if len(e.text.split()) == 1}))
