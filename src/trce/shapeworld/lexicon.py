"""The lexicon of ShapeWorld's open caption language: `language.yaml` parsed (`language()`), every construction,
frame, opening, closing, object and intensifier with its `spec` / `heldout` half. How captions are drawn from it
is `trce.shapeworld.language`; the world's tokenizer takes its words from here (`trce.shapeworld.tokenizer`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

import yaml


@dataclass(frozen=True)
class Construction:
    """How an attribute's expression attaches to the noun: `text` with {x}, {y}, {i}, {o}, {ob} (see language.yaml)."""

    text: str
    forms: tuple[str, ...]
    position: str
    group: str
    attribute: str = ""


class Language:
    """The parsed `language.yaml`."""

    def __init__(self, raw: dict):
        self.raw = raw

    def _split(self, entry, group: str) -> list:
        if group == "all":
            return list(entry["spec"]) + list(entry["heldout"])
        return list(entry[group])

    def objects(self, value: str, group: str = "all") -> list[str]:
        """Things that have colour `value` ("a ripe tomato")."""
        entry = self.raw["objects"].get(value)
        return self._split(entry, group) if entry else []

    def intensifiers(self, group: str = "all") -> list[str]:
        return self._split(self.raw["intensifiers"], group)

    def constructions(self, attribute: str, group: str = "all", position: str | None = None,
                      form: str | None = None) -> list[Construction]:
        out = []
        for g in (("spec", "heldout") if group == "all" else (group,)):
            for pos, items in self.raw["constructions"][attribute][g].items():
                if position is not None and pos != position:
                    continue
                for item in items:
                    c = Construction(item["text"], tuple(item["forms"]), pos, g, attribute)
                    if form is None or form in c.forms:
                        out.append(c)
        return out

    def frames(self, group: str = "all") -> list[str]:
        return self._split(self.raw["frames"], group)

    def openings(self, group: str = "all") -> list[str]:
        return self._split(self.raw["openings"], group)

    def closings(self, group: str = "all") -> list[str]:
        return self._split(self.raw["closings"], group)

    def writings(self, group: str = "all") -> list[str]:
        return self._split(self.raw["writing"], group)

    def all_text(self) -> list[str]:
        """Every string the language can put in a caption (for building the tokenizer)."""
        out = [*self.frames(), *self.openings(), *self.closings(), *self.intensifiers()]
        for value in self.raw["objects"]:
            out.extend(self.objects(value))
        for attribute in self.raw["constructions"]:
            out.extend(c.text for c in self.constructions(attribute))
        return out


@functools.cache
def language() -> Language:
    text = resources.files("trce.shapeworld").joinpath("language.yaml").read_text()
    return Language(yaml.safe_load(text))
