"""Prompt pairs and preservation captions for ShapeWorld concept specs, from the world's grammar and its open
language (`trce.shapeworld.language`), `spec` forms only.

A ShapeWorld caption's noun phrase is `[pattern] [color] shape [color-paraphrase] [pattern-paraphrase]`:
keywords and synonyms go before the shape noun and paraphrases after it, exactly as
`trce.shapeworld.world.noun_phrase` writes training captions. For a pair, the erased attribute's
slot holds the expression on the malicious side and the target on the safe side, each placed
by its own form; the other attributes are drawn as in training (same mention probabilities and
forms), from the `spec` group only, so no held-out word ever reaches the eraser.

Safe targets (measured choice documented in `builtin/shapeworld-red.yaml`): `""` leaves a color
or pattern unnamed ("a red circle" -> "a circle"); for shapes the noun slot cannot be empty, and
the world's own word for an unnamed shape, "shape", is the neutral target.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from trce.concepts.model import Expression, Pair
from trce.shapeworld import world
from trce.utils.text import END, START, assemble


class ShapeWorldSpec(Protocol):
    """What the pairs read of a ShapeWorld `ConceptSpec` (`trce.concepts.spec`, which calls this module)."""

    @property
    def expressions(self) -> Sequence[Expression]: ...
    @property
    def templates(self) -> Sequence[str]: ...
    @property
    def attribute(self) -> str | None: ...
    @property
    def values(self) -> Sequence[str]: ...
    @property
    def contexts(self) -> int: ...
    @property
    def open(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def family(self) -> str | None: ...


def _form_of(attribute: str, text: str) -> str:
    """keyword/synonym/paraphrase of a text in the slot of `attribute` (by the vocabulary, else by length)."""
    v = world.vocab()
    for value in v.values(attribute):
        for form in world.FORMS:
            if text in v.expressions(attribute, value, form, "all"):
                return form
    return "paraphrase" if " " in text.strip() else "keyword"


def _draw(rng: np.random.Generator, attribute: str, value: str) -> tuple[str, str] | None:
    """(form, expression) naming `value` as training captions do (spec group), or None when unnamed."""
    style = world.TRAIN_STYLE
    if rng.random() >= style.mention[attribute]:
        return None
    probs = np.asarray(style.forms[attribute], dtype=float)
    form = world.FORMS[int(rng.choice(3, p=probs / probs.sum()))]
    items = world.vocab().expressions(attribute, value, form, "spec" if attribute != "background" else "all")
    return form, items[int(rng.integers(len(items)))]


def _noun_phrase(words: dict[str, tuple[str, str] | None], slot_attr: str, slot_text: str) -> str:
    """The noun phrase with the slot marked; `words` holds the other attributes' (form, text)."""
    slot = START + slot_text + END
    slot_form = _form_of(slot_attr, slot_text) if slot_text else "keyword"

    def pre(attribute: str) -> list[str]:
        if attribute == slot_attr:
            return [slot] if slot_form != "paraphrase" else []
        item = words.get(attribute)
        return [item[1]] if item and item[0] != "paraphrase" else []

    def post(attribute: str) -> list[str]:
        if attribute == slot_attr:
            return [slot] if slot_form == "paraphrase" else []
        item = words.get(attribute)
        return [item[1]] if item and item[0] == "paraphrase" else []

    if slot_attr == "shape":
        noun = slot
    else:
        noun = words["shape"][1] if words.get("shape") else "shape"
    return " ".join(pre("pattern") + pre("color") + [noun] + post("color") + post("pattern"))


def _render(template: str, np_marked: str, bg: str | None) -> tuple[str, tuple[int, int]]:
    plain = np_marked.replace(START, "").replace(END, "").strip()
    text = template.format(np=np_marked, bg=bg, a=world.article(plain), a_bg=world.article(bg or ""))
    return assemble(text)


OBJECT_PARAPHRASE = "the color of {x}"  # how the world's grammar names a colour through an object


def shapeworld_pairs(spec: ShapeWorldSpec) -> list[Pair]:
    """expressions x templates x `spec.contexts` scenes in the world's grammar, then `spec.open` prompts per
    expression in the open language's spec constructions and frames; deterministic in `spec.seed`."""
    attribute = spec.attribute or ""
    rng = np.random.default_rng([spec.seed, 7919])
    out = []
    for expr in spec.expressions:
        value = expr.value or spec.values[0]
        # an object ("a strawberry") is named as the grammar's paraphrases are: "the color of a strawberry"
        construction = OBJECT_PARAPHRASE if expr.form == "object" else "{x}"
        slot = construction.replace("{x}", expr.text)
        target = expr.target_for(spec.family)
        for template in spec.templates:
            for _ in range(spec.contexts):
                scene = world.sample_scene(rng, **{attribute: value})
                words = {a: _draw(rng, a, scene.attribute(a)) for a in world.ATTRIBUTES if a != attribute}
                bg = None
                if "{bg}" in template:
                    bg_word = words.get("background")
                    bg = bg_word[1] if bg_word else scene.background
                m_text, m_span = _render(template, _noun_phrase(words, attribute, slot), bg)
                s_text, s_span = _render(template, _noun_phrase(words, attribute, target), bg)
                out.append(Pair(m_text, s_text, m_span, s_span, expr.text, target, construction))
    return out + open_pairs(spec)


def open_pairs(spec: ShapeWorldSpec) -> list[Pair]:
    """`spec.open` prompts per expression in the open language (spec constructions, frames, fillers and writing;
    spec words for the other attributes): the construction holding the expression is the slot, and the safe
    side drops it (a colour or pattern) or names the shape "shape"."""
    from trce.shapeworld.language import OpenStyle, draft

    if not spec.open:
        return []
    attribute = spec.attribute or ""
    rng = np.random.default_rng([spec.seed, 7927])
    style = OpenStyle(group="spec", words="spec")
    out = []
    for expr in spec.expressions:
        value = expr.value or spec.values[0]
        form = expr.form or _form_of(attribute, expr.text)
        target = expr.target_for(spec.family)
        for _ in range(spec.open):
            d = draft(world.sample_scene(rng, **{attribute: value}), rng, style, slot=attribute,
                      slot_expr=(form, expr.text))
            m_text, m_span = d.render(d.slot_text())
            s_text, s_span = d.render(target)
            out.append(Pair(m_text, s_text, m_span, s_span, expr.text, target, d.template))
    return out


def shapeworld_captions(attribute: str, values: tuple[str, ...], n: int, seed: int = 0) -> list[str]:
    """`n` captions of scenes whose `attribute` is none of `values`, from `spec` forms only: half in the world's
    grammar (spec synonyms and paraphrases), half in the open language's spec constructions and frames.

    They never name an erased value (the scene does not have it), but name every other value in every spec
    form: the preservation set is about what must not move, and held-out forms stay held out.
    """
    from trce.shapeworld.language import OPEN_SHARE, OpenStyle, open_caption

    v = world.vocab()
    others = [x for x in v.values(attribute) if x not in values]
    rng = np.random.default_rng([seed, 104729])
    grammar = world.CaptionStyle(forms=world.TRAIN_STYLE.forms, mention=world.TRAIN_STYLE.mention, group="spec")
    style = OpenStyle(group="spec", words="spec")
    out = []
    for _ in range(n):
        scene = world.sample_scene(rng, **{attribute: others[int(rng.integers(len(others)))]})
        out.append(open_caption(scene, rng, style)[0] if rng.random() < OPEN_SHARE else world.caption(scene, rng, grammar))
    return out
