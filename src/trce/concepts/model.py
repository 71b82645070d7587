"""The value types of a concept spec: an `Expression` of the concept, where its `Preservation` prompts come from, and a
(malicious, safe) prompt `Pair`; `fill` puts a text in a template's slot.

They sit below `trce.concepts.spec` (`ConceptSpec`) and `trce.concepts.shapeworld` (which builds ShapeWorld pairs),
so that neither imports the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from trce.utils.text import END, START, assemble

SLOT = re.compile(r"\{(?:concept)?\}")  # a text template's slot: `{}` or `{concept}`


@dataclass(frozen=True)
class Expression:
    """One way of naming the concept, and the safe text that replaces it.

    `target == ""` leaves the attribute unnamed (ShapeWorld: "a red circle" -> "a circle").
    `value`/`form` say which ShapeWorld value it names and how (keyword, synonym, paraphrase);
    `group` is a free label (the I2P category, for instance).
    """

    text: str
    target: str
    group: str | None = None
    value: str | None = None
    form: str | None = None
    # ((family, target), ...): the safe text on those model families instead of `target` (a target measured on one
    # denoiser need not transfer: ShapeWorld-DiT keeps drawing red for "a circle" after T, not for "a blue circle")
    family_targets: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        # a record's {family: target} mapping (`ConceptSpec.to_dict`) or pairs -> hashable pairs
        object.__setattr__(self, "family_targets", tuple(dict(self.family_targets).items()))

    def target_for(self, family: str | None) -> str:
        """The safe text on `family` (None: the default `target`)."""
        return dict(self.family_targets).get(family, self.target) if family else self.target


@dataclass(frozen=True)
class Preservation:
    """Where the prompts whose projections must not move come from."""

    source: str = "none"
    prompts: tuple[str, ...] = ()
    file: str | None = None
    column: str = "prompt"
    n: int | None = None  # at most this many prompts (a seeded random subset of a file)
    seed: int = 0


@dataclass(frozen=True)
class Pair:
    """A malicious prompt and its safe counterpart, with the slot's character span on each side.

    `construction` is the slot's text with the expression as {x} ("that is {x}", "{x} {x}"): the same
    prompt naming another concept puts that concept's expression there (`other_concept_prompts`).
    """

    malicious: str
    safe: str
    m_span: tuple[int, int]
    s_span: tuple[int, int]
    expression: str
    target: str
    construction: str = "{x}"


def fill(template: str, text: str) -> tuple[str, tuple[int, int]]:
    """Put `text` in the template's slot: (prompt, character span of `text` in it).

    An empty `text` leaves a zero-width span where the slot was, without doubled spaces.
    """
    pre, post = SLOT.split(template, maxsplit=1)
    return assemble(pre + START + text + END + post)
