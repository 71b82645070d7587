"""`ConceptSpec`: what to erase, what to map it to, and what to keep (the YAML format: `trce.concepts.parse`), and
what the methods take from one spec or several: pairs, preservation prompts, records, other concepts' prompts."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from trce.concepts.model import Expression, Pair, Preservation, fill
from trce.concepts.sources import read_preservation


@dataclass(frozen=True)
class ConceptSpec:
    name: str
    expressions: tuple[Expression, ...]
    templates: tuple[str, ...]
    preservation: Preservation = Preservation()  # noqa: RUF009 (a frozen dataclass: one shared default is safe)
    aliases: tuple[str, ...] = ()
    description: str = ""
    eta: float = 0.01
    ridge: float = 1e-4
    token_role: str = "eot"
    attribute: str | None = None  # ShapeWorld only: color, shape or pattern
    values: tuple[str, ...] = ()  # ShapeWorld only: the erased values of `attribute`
    contexts: int = 4  # ShapeWorld only: random scenes per (expression, template)
    open: int = 0  # ShapeWorld only: prompts per expression in the open language's spec constructions
    seed: int = 0  # ShapeWorld only: seed of those scenes
    # Recommended settings of later stages for this concept, e.g. {"V": {"lr": 1e-4}}: ShapeWorld's
    # 3.5M-parameter UNet needs larger steps than the paper's SD settings. --config / --set win.
    settings: dict = field(default_factory=dict, compare=False, hash=False)
    # Per model family, settings that win over `settings` (and the spec's eta / ridge through T's) on that
    # family, e.g. {"sdxl": {"T": {"eta": 0.03}, "V": {"lr": 1e-4}}}: a setting tuned on one denoiser need
    # not transfer to another (measured on ShapeWorld-XL). --config / --set still win.
    family_settings: dict = field(default_factory=dict, compare=False, hash=False)
    source: str | None = field(default=None, compare=False)  # the YAML file it came from
    family: str | None = None  # the model family whose `family_targets` the pairs take (`for_family`)

    @property
    def shapeworld(self) -> bool:
        return self.attribute is not None

    @property
    def value(self) -> str | None:
        """The erased ShapeWorld value when there is exactly one (None for text specs or several values)."""
        return self.values[0] if len(self.values) == 1 else None

    def for_family(self, family: str | None) -> ConceptSpec:
        """The spec as erased on `family`: its pairs take the expressions' `family_targets` of that family."""
        return self if family == self.family else replace(self, family=family)

    def pairs(self) -> list[Pair]:
        """Every (malicious, safe) prompt pair: expressions x templates (x contexts for ShapeWorld)."""
        if self.shapeworld:
            from trce.concepts.shapeworld import shapeworld_pairs  # numpy and the world, only for ShapeWorld specs

            return shapeworld_pairs(self)
        out = []
        for expr in self.expressions:
            target = expr.target_for(self.family)
            for template in self.templates:
                m_text, m_span = fill(template, expr.text)
                s_text, s_span = fill(template, target)
                out.append(Pair(m_text, s_text, m_span, s_span, expr.text, target))
        return out

    def preservation_prompts(self, data_dir: str | Path | None = None) -> list[str]:
        """The preservation prompts (`data_dir` holds `prompts/coco_30k.csv` for `source: coco`)."""
        return read_preservation(self.preservation, self.name, self.attribute, self.values, data_dir)

    def to_dict(self) -> dict:
        """A JSON-able record of the resolved spec (expressions expanded), as stored in patches."""
        d = asdict(self)
        d["expressions"] = [{k: dict(v) if k == "family_targets" else v for k, v in e.items() if v not in (None, ())}
                            for e in d["expressions"]]
        if self.family is None:
            d.pop("family")
        d["preserve"] = {k: v for k, v in d.pop("preservation").items() if v not in (None, ())}
        d["value"] = self.value
        for key in ("attribute", "values", "value", "contexts", "open", "seed"):
            if not self.shapeworld:
                d.pop(key, None)
        return d


def as_specs(spec: ConceptSpec | Sequence[ConceptSpec]) -> list[ConceptSpec]:
    """One spec or several -> a list (several specs are erased together, by one solve)."""
    return [spec] if isinstance(spec, ConceptSpec) else list(spec)


def preservation_prompts_of(specs: Sequence[ConceptSpec], data_dir) -> list[str]:
    """The specs' preservation prompts, deduplicated in order; each distinct preservation source is read once (1,000
    specs sharing COCO's captions read the CSV once, not 1,000 times: ~60 of 112 s on sd14-arch)."""
    read: dict = {}
    for s in specs:
        key = (s.preservation, s.attribute, s.values)  # what the prompts depend on
        if key not in read:
            read[key] = s.preservation_prompts(data_dir)
    return list(dict.fromkeys(p for prompts in read.values() for p in prompts))


def spec_record(spec: ConceptSpec | Sequence[ConceptSpec]) -> dict:
    """What a patch records as its spec: the spec's dict, or {name: "a+b", concepts: [...]} for several."""
    specs = as_specs(spec)
    if len(specs) == 1:
        return specs[0].to_dict()
    return {"name": "+".join(s.name for s in specs), "concepts": [s.to_dict() for s in specs]}


def _same_case(text: str, like: str) -> str:
    """`text` written as `like` is (open-language prompts come in lower, Title and UPPER case)."""
    if like.isupper() and len(like) > 1:
        return text.upper()
    if like[:1].isupper():
        return text.title()
    return text


def other_concept_prompts(spec: ConceptSpec | Sequence[ConceptSpec]) -> dict[str, list[str]]:
    """For each malicious prompt, the same prompt with each *other* erased concept in its slot.

    A concept is a ShapeWorld value (`circle`, `star`, `triangle` of shapeworld-3shapes), an expression
    group (the I2P categories) or, for several specs erased together, each spec's own concepts. The other
    concept is named by its first expression of the same form as the slot's (keyword for a keyword,
    a paraphrase for a paraphrase), else by its first expression: "a dotted circle on a white background"
    -> ["a dotted star on a white background", "a dotted triangle on a white background"]. A spec with one
    concept has no others (empty lists). Every prompt gets one prompt per other concept, in one order.
    """
    specs = as_specs(spec)
    labels: dict[tuple[str, str], list[Expression]] = {}  # concept -> its expressions, in spec order
    of_text: dict[tuple[str, str], tuple[tuple[str, str], str | None]] = {}  # (spec, text) -> (concept, form)
    for s in specs:
        for e in s.expressions:
            label = (s.name, e.value or e.group or "")
            labels.setdefault(label, []).append(e)
            of_text.setdefault((s.name, e.text), (label, e.form))

    def name(label: tuple[str, str], form: str | None) -> str:
        same = [e for e in labels[label] if e.form == form]
        return (same or labels[label])[0].text

    out: dict[str, list[str]] = {}
    for s in specs:
        for p in s.pairs():
            own, form = of_text[(s.name, p.expression)]
            a, b = p.m_span
            prompts = []
            for label in labels:
                if label == own:
                    continue
                text = _same_case(p.construction.replace("{x}", name(label, form)), p.malicious[a:b])
                pre = p.malicious[:a]
                if m := re.search(r"(^|\s)(an?) $", pre, flags=re.IGNORECASE):  # the article follows the new word
                    article = _same_case("an" if text[:1].lower() in "aeiou" else "a", m.group(2))
                    pre = pre[: m.start(2)] + article + " "
                prompts.append(pre + text + p.malicious[b:])
            out.setdefault(p.malicious, prompts)
    return out


def preservation_prompts(spec: ConceptSpec, data: str | Path | None = None) -> list[str]:
    """`spec.preservation_prompts(data)`."""
    return spec.preservation_prompts(data)
