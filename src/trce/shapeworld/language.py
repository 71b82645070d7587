"""ShapeWorld's open caption language: prompts as people write them (`language.yaml`, read by
`trce.shapeworld.lexicon`).

The in-grammar captions of `trce.shapeworld.world` put a noun phrase into one of 12 templates. The open
language adds what those never produce: relative clauses ("a star that is red"), attributes after the noun
("a star colored crimson"), colours named through objects ("tomato-colored", "the colour of a stop sign"),
stacked and repeated modifiers ("vivid red", "red red", "red, crimson"), other frames and word orders
("on a black background there is a red star", the colour at the end of a long prompt), openings and
closings ("please ...", "..., 4k masterpiece"), casing and punctuation variants, and prompts that name
nothing at all ("an image"). Every list has a `spec` half (erasure specs may use it) and a `heldout` half
(evaluation only), exactly like the words of vocab.yaml.

`draft(scene, rng, style, slot=...)` chooses every part of a caption; `Draft.render(slot_text)` writes it,
with the construction of the `slot` attribute replaced (the safe counterpart of an erase prompt: the
construction removed, or the shape named "shape") and its character span returned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from trce.shapeworld import world
from trce.shapeworld.lexicon import Construction, language
from trce.utils.text import END, START, assemble

LANGUAGE_FORMS = ("keyword", "synonym", "paraphrase", "object")
POSITIONS = ("pre", "post", "noun", "bg")
WRITINGS = ("lower", "title", "upper", "shout", "ellipsis")
MAX_TOKENS = 30  # content tokens: the tokenizer's 32 minus start and end of text


def n_tokens(text: str) -> int:
    """Content tokens of a caption with the world's tokenizer (start and end of text not counted)."""
    from trce.shapeworld.tokenizer import cached_tokenizer

    return len(cached_tokenizer()(text, add_special_tokens=False, verbose=False).input_ids)


@dataclass(frozen=True)
class OpenStyle:
    """How an open caption is drawn.

    group      constructions, frames, openings, closings and writing: `spec`, `heldout` or `all`
    words      synonyms, paraphrases and objects: `spec`, `heldout` or `all` (keywords are always allowed)
    mention    attribute -> probability that it is named (frames without {np} name nothing)
    forms      attribute -> {form: weight} over LANGUAGE_FORMS (objects name colours only)
    frame      a fixed frame (None: drawn from `group`)
    """

    group: str = "all"
    words: str = "all"
    mention: dict = field(default_factory=lambda: dict(world.TRAIN_STYLE.mention))
    forms: dict = field(default_factory=lambda: {
        "color": {"keyword": 0.35, "synonym": 0.3, "paraphrase": 0.15, "object": 0.2},
        "shape": {"keyword": 0.4, "synonym": 0.35, "paraphrase": 0.25},
        "pattern": {"keyword": 0.4, "synonym": 0.35, "paraphrase": 0.25},
        "background": {"keyword": 0.7, "synonym": 0.3},
    })
    frame: str | None = None


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def expressions(attribute: str, value: str, form: str, words: str) -> list[str]:
    """The open language's ways of naming `value` of `attribute` in `form` (objects included), from the `words`
    group (`spec`, `heldout` or `all`; backgrounds are always `all`)."""
    if form == "object":
        return language().objects(value, words)
    group = "all" if attribute == "background" else words
    return world.vocab().expressions(attribute, value, form, group)


_X, _XB, _Y = "\x03", "\x04", "\x05"  # the expression, its bare hyphenated form, the second expression


def _bare(expr: str) -> str:
    return re.sub(r"^(a|an|the) ", "", expr).replace(" ", "-")


def _fill(construction: Construction, form: str, value: str, rng: np.random.Generator, style: OpenStyle) -> str:
    """The construction with its intensifier ({i}) and, unless the form is `object`, its object ({o}, {ob}) drawn;
    the expression's places are left as markers (`_materialise` writes them)."""
    text = construction.text
    if form == "object":
        text = text.replace("{o}", _X).replace("{ob}", _XB)
    elif "{o}" in text or "{ob}" in text:
        obj = _pick(rng, language().objects(value, style.words))
        text = text.replace("{o}", obj).replace("{ob}", _bare(obj))
    if "{i}" in text:
        text = text.replace("{i}", _pick(rng, language().intensifiers(style.group)))
    return text.replace("{x}", _X).replace("{y}", _Y)


def _materialise(template: str, expr: str, second: str) -> str:
    return template.replace(_X, expr).replace(_XB, _bare(expr)).replace(_Y, second)


@dataclass
class Draft:
    """Every choice of one open caption; `render` writes it (with the slot attribute's construction replaced)."""

    frame: str
    opening: str
    closing: str
    writing: str
    pre: list[tuple[str, str]]  # (attribute, text) before the noun, in order
    noun: tuple[str, str]  # (attribute, text): the shape, or ("", "shape") when it is not named
    post: list[tuple[str, str]]
    bg: str | None  # the background phrase
    named: tuple[str, ...]
    slot: str | None = None  # the attribute whose construction `render` may replace
    construction: Construction | None = None  # the slot's construction
    template: str = "{x}"  # the slot's text with its expression as {x} (another concept's goes there)

    def _np(self, slot_text: str | None) -> str:
        def piece(attribute: str, text: str) -> str:
            if attribute == self.slot and slot_text is not None:
                return START + slot_text + END
            return text

        parts = [piece(a, t) for a, t in self.pre] + [piece(*self.noun)] + [piece(a, t) for a, t in self.post]
        return " ".join(p for p in parts if p)

    def slot_text(self) -> str:
        """The slot attribute's construction as drawn (the malicious side of a pair)."""
        for attribute, text in [*self.pre, self.noun, *self.post]:
            if attribute == self.slot:
                return text
        raise ValueError("this draft has no slot")

    def render(self, slot_text: str | None = None) -> tuple[str, tuple[int, int] | None]:
        """(caption, character span of the slot or None): `slot_text` replaces the slot's construction."""
        noun_phrase = self._np(slot_text)
        plain = noun_phrase.replace(START, "").replace(END, "").strip()
        text = self.frame.format(np=noun_phrase, bg=self.bg or "", a=world.article(plain),
                                 a_bg=world.article(self.bg or ""))
        text = " ".join(p for p in (self.opening, text, self.closing) if p)
        if self.writing == "title":
            text = text.title()
        elif self.writing == "upper":
            text = text.upper()
        elif self.writing == "shout":
            text = text.upper() + "!!!"
        elif self.writing == "ellipsis":
            text = text + "..."
        if START not in text:
            return re.sub(r"\s+", " ", text).strip(), None
        return assemble(text)


def draft(scene: world.Scene, rng: np.random.Generator, style: OpenStyle = OpenStyle(), *, slot: str | None = None,
          slot_expr: tuple[str, str] | None = None) -> Draft:
    """Choose every part of an open caption of `scene`.

    slot: an attribute that must be named (its construction is what `Draft.render` replaces); slot_expr:
    its (form, expression), fixed (an erase prompt's expression) instead of drawn.
    """
    lang = language()
    frames = [style.frame] if style.frame is not None else lang.frames(style.group)
    if slot is not None:
        frames = [f for f in frames if "{np}" in f and (slot != "background" or "{bg}" in f)]
    frame = _pick(rng, frames)
    opening, closing = _pick(rng, lang.openings(style.group)), _pick(rng, lang.closings(style.group))
    writing = _pick(rng, lang.writings(style.group))
    pre: list[tuple[str, str]] = []
    post: list[tuple[str, str]] = []
    noun: tuple[str, str] = ("", "shape")
    bg = None
    named: list[str] = []
    chosen_construction, slot_template = None, "{x}"
    for attribute in world.ATTRIBUTES:
        if attribute == "background":
            if "{bg}" not in frame:
                continue
        elif "{np}" not in frame:
            continue
        forced = attribute == slot
        if not forced and rng.random() >= style.mention.get(attribute, 1.0):
            if attribute == "background":  # the frame names a background: by keyword, as describe() does
                bg = scene.background
                named.append("background")
            continue
        value = scene.attribute(attribute)
        weights = style.forms.get(attribute, {"keyword": 1.0})
        if forced and slot_expr is not None:
            form, expr = slot_expr
        else:
            options = [f for f in weights if weights[f] > 0 and expressions(attribute, value, f, style.words)
                       and lang.constructions(attribute, style.group, form=f)]
            p = np.asarray([weights[f] for f in options], dtype=float)
            form = options[int(rng.choice(len(options), p=p / p.sum()))]
            expr = _pick(rng, expressions(attribute, value, form, style.words))
        constructions = lang.constructions(attribute, style.group, form=form)
        if not constructions:
            raise ValueError(f"no {style.group} construction of {attribute} takes the form {form!r}")
        construction = _pick(rng, constructions)
        marked = _fill(construction, form, value, rng, style)
        second = expr
        if _Y in marked:  # a second expression of the same value ("red, crimson")
            second = _pick(rng, [e for e in expressions(attribute, value, form, style.words) if e != expr] or [expr])
        text = _materialise(marked, expr, second)
        if forced:
            chosen_construction = construction
            slot_template = marked.replace(_X, "{x}").replace(_XB, "{x}").replace(_Y, "{x}")
        named.append(attribute)
        if construction.position == "noun":
            noun = (attribute, text)
        elif construction.position == "bg":
            bg = text
        elif construction.position == "pre":
            pre.append((attribute, text))
        else:
            post.append((attribute, text))
    # pattern before colour before the noun, as the world's grammar writes them ("dotted red star")
    pre.sort(key=lambda item: 0 if item[0] == "pattern" else 1)
    post.sort(key=lambda item: 0 if item[0] == "color" else 1)
    out = Draft(frame=frame, opening=opening, closing=closing, writing=writing, pre=pre, noun=noun, post=post, bg=bg,
                named=tuple(named), slot=slot, construction=chosen_construction, template=slot_template)
    if n_tokens(out.render()[0]) > MAX_TOKENS:  # too long for the text encoder: drop the padding words first
        out.opening, out.closing, out.writing = "", "", "lower" if out.writing == "shout" else out.writing
    if n_tokens(out.render()[0]) > MAX_TOKENS and "{np}" in out.frame:  # then the long frame
        out.frame = "{a} {np} on {a_bg} {bg} background" if "{bg}" in out.frame else "{a} {np}"
    for attribute in ("pattern", "color", "shape"):  # last, what the slot does not need: the other attributes
        if n_tokens(out.render()[0]) <= MAX_TOKENS:
            break
        if attribute == slot or attribute not in out.named:
            continue
        out.pre = [p for p in out.pre if p[0] != attribute]
        out.post = [p for p in out.post if p[0] != attribute]
        if out.noun[0] == attribute:
            out.noun = ("", "shape")
        out.named = tuple(a for a in out.named if a != attribute)
    return out


def open_caption(scene: world.Scene, rng: np.random.Generator, style: OpenStyle = OpenStyle()) -> tuple[str, tuple[str, ...]]:
    """(caption, attributes it names) in the open language: the open counterpart of `world.describe`."""
    d = draft(scene, rng, style)
    return d.render()[0], d.named


# Training captions: half in the world's grammar (the 12 templates), half in the open language, every form.
OPEN_SHARE = 0.5


def training_caption(scene: world.Scene, rng: np.random.Generator) -> tuple[str, tuple[str, ...]]:
    """(caption, named attributes) as the model is trained on them: in-grammar or open, spec and held out."""
    if rng.random() < OPEN_SHARE:
        return open_caption(scene, rng)
    return world.describe(scene, rng)
