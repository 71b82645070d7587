"""`ConceptSpec`: what to erase, what to map it to, and what to keep, read from YAML.

A spec file (see `builtin/*.yaml`; every key is optional except `name`, `erase` and `templates`)::

    name: sexual
    aliases: [nudity]
    description: nudity and sexual content
    erase:                                  # one group, or a list of groups
      target: a person wearing clothes      # the safe counterpart of every expression in the group
      expressions: [nudity, naked woman, {text: erotic, target: a person in a coat}]
    templates: ["a photo of {}", "{concept}, oil painting"]   # one `{}` / `{concept}` slot each
    preserve: {source: coco, n: 1000, seed: 0}   # prompts | file | coco | shapeworld-captions | none
    eta: 0.01                                    # weight of the preservation term (Eq. 4)
    ridge: 0.0001                                # relative ridge, see trce.methods.stage_t
    token_role: eot                              # see trce.tokens
    settings: {V: {lr: 1.0e-4}, kpop: {lr: 1.0e-4}}   # per stage (see `trce methods`): defaults for this concept

A spec may start from another: `extends: shapeworld-red` (a built-in name or alias, or a YAML path, relative to the
spec's folder) takes every field of that spec except `name`, `aliases` and `description`; the spec's own fields
replace the base's whole, except `settings` and `family_settings`, which merge key by key (`settings: {V: {lr: ...}}`
changes V's lr and keeps the base's other V, KPOP and ESD settings). A base may extend another; a cycle is an error.

ShapeWorld specs add `attribute` and `value` (or `values`), may say `expressions: from-vocab`
(the value's keyword and its `spec`-group synonyms, paraphrases and, with `forms: [..., object]`, the
objects that have a colour, from the world's vocabulary and open language, never the held-out ones),
`templates: from-world` (the world's caption templates, filled with `contexts` random scenes each) and
`open: N` (N more prompts per expression in the open language's `spec` constructions and frames; see
`trce.concepts.shapeworld` and `trce.shapeworld.language`).

A malicious prompt is a template with an expression in its slot; its safe counterpart is the same
template with the expression's target. `ConceptSpec.pairs()` lists them with the character span
of the slot on both sides, which `trce.tokens` turns into token positions.
"""

from __future__ import annotations

import csv
import difflib
import functools
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from trce.errors import TrceError, choose
from trce.utils.text import END, START, assemble

log = logging.getLogger(__name__)

SOURCES = ("prompts", "file", "coco", "shapeworld-captions", "none")
COCO_FILE = Path("prompts") / "coco_30k.csv"
_SLOT = re.compile(r"\{(?:concept)?\}")
_TOP_KEYS = ("name", "aliases", "description", "erase", "templates", "preserve", "eta", "ridge", "token_role",
             "attribute", "value", "values", "contexts", "open", "seed", "settings", "family_settings", "extends")
_NOT_INHERITED = ("name", "aliases", "description")  # what an `extends:` spec never takes from its base
_MERGED = ("settings", "family_settings")  # merged key by key (at every depth) with the base's; the rest replaces


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


@dataclass(frozen=True)
class ConceptSpec:
    name: str
    expressions: tuple[Expression, ...]
    templates: tuple[str, ...]
    preservation: Preservation = Preservation()
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
            from trce.concepts.shapeworld import shapeworld_pairs

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
        return preservation_prompts(self, data_dir)

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


def fill(template: str, text: str) -> tuple[str, tuple[int, int]]:
    """Put `text` in the template's slot: (prompt, character span of `text` in it).

    An empty `text` leaves a zero-width span where the slot was, without doubled spaces.
    """
    pre, post = _SLOT.split(template, maxsplit=1)
    return assemble(pre + START + text + END + post)


# --------------------------------------------------------------------------- reading YAML
class _Reader:
    """Typed access to a YAML mapping; every error names the field and the file."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, problem: str) -> TrceError:
        return TrceError(f"concept spec {self.where}: field {key!r} {problem}")

    def string(self, raw: Any, key: str, allow_empty: bool = False) -> str:
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            raise self.fail(key, f"must be a string, got {type(raw).__name__} {raw!r}")
        text = str(raw).strip()
        if not text and not allow_empty:
            raise self.fail(key, "must not be empty")
        return text

    def strings(self, raw: Any, key: str) -> tuple[str, ...]:
        if raw is None:
            return ()
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list):
            raise self.fail(key, f"must be a list of strings, got {type(raw).__name__}")
        return tuple(self.string(x, f"{key}[{i}]") for i, x in enumerate(raw))

    def number(self, raw: Any, key: str, low: float = 0.0) -> float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise self.fail(key, f"must be a number, got {raw!r}")
        if raw < low:
            raise self.fail(key, f"must be at least {low}, got {raw}")
        return float(raw)

    def integer(self, raw: Any, key: str, low: int = 0) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise self.fail(key, f"must be an integer, got {raw!r}")
        if raw < low:
            raise self.fail(key, f"must be at least {low}, got {raw}")
        return int(raw)

    def mapping(self, raw: Any, key: str, allowed: tuple[str, ...]) -> dict:
        if not isinstance(raw, dict):
            raise self.fail(key, f"must be a mapping, got {type(raw).__name__}")
        for k in raw:
            if k not in allowed:
                close = difflib.get_close_matches(str(k), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.fail(f"{key}.{k}" if key else str(k),
                                f"is not a known field{hint}; known: {', '.join(allowed)}")
        return raw


def spec_from_dict(raw: Any, where: str = "<dict>", base_dir: Path | None = None) -> ConceptSpec:
    """Validate a parsed YAML mapping into a `ConceptSpec` (errors name the bad field and `where`)."""
    r = _Reader(where)
    raw = r.mapping(raw, "", _TOP_KEYS)
    if "extends" in raw:
        top = Path(where).resolve() if base_dir is not None and Path(where).is_file() else None
        raw = _extended(r, raw, base_dir, (top,) if top is not None else ())
    for key in ("name", "erase", "templates"):
        if key not in raw:
            raise r.fail(key, "is missing")
    name = r.string(raw["name"], "name")
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.+-]*", name):
        raise r.fail("name", f"must be lower-case letters, digits, '-', '_', '.' or '+', got {name!r}")
    attribute = raw.get("attribute")
    values: tuple[str, ...] = ()
    if attribute is not None:
        attribute, values = _shapeworld_target(r, raw)
    elif "value" in raw or "values" in raw:
        raise r.fail("value", "needs `attribute` (ShapeWorld specs only)")

    expressions = _expressions(r, raw["erase"], attribute, values)
    templates = _templates(r, raw["templates"], attribute is not None)
    from trce.tokens import parse_role

    token_role = r.string(raw.get("token_role", "eot"), "token_role")
    try:
        parse_role(token_role)
    except TrceError as exc:
        raise r.fail("token_role", str(exc)) from None
    return ConceptSpec(
        name=name,
        aliases=r.strings(raw.get("aliases"), "aliases"),
        description=r.string(raw.get("description", ""), "description", allow_empty=True),
        expressions=expressions,
        templates=templates,
        preservation=_preservation(r, raw.get("preserve", {"source": "none"}), attribute, base_dir),
        eta=r.number(raw.get("eta", 0.01), "eta"),
        ridge=r.number(raw.get("ridge", 1e-4), "ridge"),
        token_role=token_role,
        attribute=attribute,
        values=values,
        contexts=r.integer(raw.get("contexts", 4), "contexts", low=1),
        open=r.integer(raw.get("open", 0), "open", low=0),
        seed=r.integer(raw.get("seed", 0), "seed"),
        settings=_settings(r, raw.get("settings", {})),
        family_settings=_family_settings(r, raw.get("family_settings", {})),
        source=where,
    )


def _extended(r: _Reader, raw: dict, base_dir: Path | None, chain: tuple[Path, ...]) -> dict:
    """`raw` (which has `extends:`) on top of its base's fields, resolved recursively (module doc)."""
    ref = r.string(raw["extends"], "extends")
    path = _base_path(r, ref, base_dir)
    if path in chain:
        loop = " -> ".join(str(p) for p in (*chain, path))
        raise r.fail("extends", f"makes a cycle: {loop}")
    base_reader = _Reader(str(path))
    base = base_reader.mapping(_read_yaml(path), "", _TOP_KEYS)
    if "extends" in base:
        base = _extended(base_reader, base, path.parent, (*chain, path))
    base = dict(base)
    preserve = base.get("preserve")
    if isinstance(preserve, dict) and isinstance(preserve.get("file"), str):  # the base's file, from the base's folder
        file = Path(preserve["file"]).expanduser()
        if not file.is_absolute() and (path.parent / file).exists():
            base["preserve"] = {**preserve, "file": str(path.parent / file)}
    out = {k: v for k, v in base.items() if k not in _NOT_INHERITED}
    for one, other in (("value", "values"), ("values", "value")):  # either names the ShapeWorld value(s)
        if one in raw:
            out.pop(other, None)
    for key, value in raw.items():
        if key != "extends":
            out[key] = _merge(out[key], value) if key in _MERGED and key in out else value
    return out


def _merge(base: Any, over: Any) -> Any:
    """`over` on top of `base`: mappings key by key at every depth, anything else replaced."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return over
    return {**base, **{k: _merge(base[k], v) if k in base else v for k, v in over.items()}}


def _base_path(r: _Reader, ref: str, base_dir: Path | None) -> Path:
    """The YAML file that `extends: ref` names: a path (relative to the extending spec's folder) or a built-in's name
    or alias (read without building every built-in, so that a built-in may extend another)."""
    if ref.endswith((".yaml", ".yml")) or os.sep in ref:
        path = Path(ref).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise r.fail("extends", f"names {ref!r}, and {path} is not a file")
        return path.resolve()
    index = _builtin_files()
    try:
        return index[choose("concept", ref, index)]
    except TrceError as exc:
        raise r.fail("extends", str(exc)) from None


@functools.cache
def _builtin_files() -> dict[str, Path]:
    """{name or alias: file} of the built-in specs, from their `name` and `aliases` fields only (once a process: the
    package's files do not change while it runs)."""
    index: dict[str, Path] = {}
    for file in sorted(builtin_dir().glob("*.yaml")):
        head = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        for name in [head.get("name"), *(head.get("aliases") or [])]:
            if isinstance(name, str):
                index.setdefault(name, file.resolve())
    return index


def _settings(r: _Reader, raw: Any, key: str = "settings") -> dict:
    """Recommended settings per stage, validated through the method registry (unknown names fail here, not
    mid-run; `trce.registry` imports no method to do it)."""
    from trce.registry import check_settings, sections

    known = tuple(sections())
    raw = r.mapping(raw, key, known)
    out = {}
    for stage, values in raw.items():
        try:
            out[stage] = check_settings(stage, values)
        except TrceError as exc:
            raise r.fail(f"{key}.{stage}", str(exc)) from None
    return out


def _family_settings(r: _Reader, raw: Any) -> dict:
    """`family_settings: {sdxl: {V: {...}}}`: per model family (see `trce.families`), settings as in `settings`."""
    from trce.families import family_names

    raw = r.mapping(raw, "family_settings", tuple(family_names()))
    return {fam: _settings(r, values, f"family_settings.{fam}") for fam, values in raw.items()}


def _family_targets(r: _Reader, raw: Any, key: str) -> tuple[tuple[str, str], ...]:
    """`family_targets: {sd3: blue}`: the group's safe text on those model families (see `trce.families`)."""
    from trce.families import family_names

    raw = r.mapping(raw, key, tuple(family_names()))
    return tuple((fam, r.string(text, f"{key}.{fam}", allow_empty=True)) for fam, text in raw.items())


def _shapeworld_target(r: _Reader, raw: dict) -> tuple[str, tuple[str, ...]]:
    from trce.shapeworld import world

    attribute = r.string(raw["attribute"], "attribute")
    if attribute not in ("color", "shape", "pattern"):
        raise r.fail("attribute", f"must be one of color, shape, pattern, got {attribute!r}")
    if ("value" in raw) == ("values" in raw):
        raise r.fail("value", "give exactly one of `value` (one value) or `values` (a list)")
    values = r.strings(raw["value"], "value") if "value" in raw else r.strings(raw["values"], "values")
    known = world.vocab().values(attribute)
    for i, v in enumerate(values):
        if v not in known:
            raise r.fail(f"values[{i}]", f"{v!r} is not a ShapeWorld {attribute}; choose from {', '.join(known)}")
    if not values:
        raise r.fail("values", "must name at least one value")
    return attribute, values


def _expressions(r: _Reader, raw: Any, attribute: str | None, values: tuple[str, ...]) -> tuple[Expression, ...]:
    groups = raw if isinstance(raw, list) else [raw]
    out: list[Expression] = []
    for gi, group in enumerate(groups):
        key = f"erase[{gi}]" if isinstance(raw, list) else "erase"
        g = r.mapping(group, key, ("target", "family_targets", "expressions", "forms", "group"))
        target = r.string(g["target"], f"{key}.target", allow_empty=True) if "target" in g else None
        by_family = _family_targets(r, g.get("family_targets", {}), f"{key}.family_targets")
        label = r.string(g["group"], f"{key}.group") if "group" in g else None
        items = g.get("expressions")
        if items is None:
            raise r.fail(f"{key}.expressions", "is missing")
        if items == "from-vocab":
            if attribute is None:
                raise r.fail(f"{key}.expressions", "`from-vocab` needs `attribute` and `value` (ShapeWorld specs)")
            if target is None:
                raise r.fail(f"{key}.target", "is missing (use \"\" to leave the attribute unnamed)")
            forms = r.strings(g.get("forms", ["keyword", "synonym", "paraphrase"]), f"{key}.forms")
            out.extend(_from_vocab(r, f"{key}.forms", attribute, values, forms, target, label, by_family))
            continue
        if "forms" in g:
            raise r.fail(f"{key}.forms", "only applies to `expressions: from-vocab`")
        if not isinstance(items, list):
            raise r.fail(f"{key}.expressions", f"must be a list or `from-vocab`, got {items!r}")
        for i, item in enumerate(items):
            ikey = f"{key}.expressions[{i}]"
            if isinstance(item, dict):
                item = r.mapping(item, ikey, ("text", "target"))
                if "text" not in item:
                    raise r.fail(f"{ikey}.text", "is missing")
                text = r.string(item["text"], f"{ikey}.text")
                tgt = r.string(item["target"], f"{ikey}.target", allow_empty=True) if "target" in item else target
            else:
                text, tgt = r.string(item, ikey), target
            if tgt is None:
                raise r.fail(f"{key}.target", f"is missing and expression {text!r} has no target of its own")
            if _SLOT.search(text) or "{" in text or "}" in text:
                raise r.fail(ikey, f"must not contain braces, got {text!r}")
            value, form = _vocab_form(attribute, text)
            out.append(Expression(text=text, target=tgt, group=label, value=value, form=form, family_targets=by_family))
    seen: set[str] = set()
    unique = []
    for e in out:  # the same expression twice would only double its weight in Eq. 5
        if e.text.lower() not in seen:
            seen.add(e.text.lower())
            unique.append(e)
    return tuple(unique)


def _from_vocab(r: _Reader, key: str, attribute: str, values: tuple[str, ...], forms: tuple[str, ...], target: str,
                label: str | None, family_targets: tuple[tuple[str, str], ...] = ()) -> list[Expression]:
    from trce.shapeworld import world
    from trce.shapeworld.language import LANGUAGE_FORMS
    from trce.shapeworld.lexicon import language

    out = []
    for form in forms:
        if form not in LANGUAGE_FORMS:
            raise r.fail(key, f"has unknown form {form!r}; choose from {', '.join(LANGUAGE_FORMS)}")
        if form == "object" and attribute != "color":
            raise r.fail(key, f"has form 'object', which names colours only (this spec erases a {attribute})")
        for value in values:
            # `spec` group only: the `heldout` synonyms, paraphrases and objects stay unseen by the eraser.
            texts = (language().objects(value, "spec") if form == "object"
                     else world.vocab().expressions(attribute, value, form, "spec"))
            for text in texts:
                out.append(Expression(text=text, target=target, group=label, value=value, form=form,
                                      family_targets=family_targets))
    return out


def _vocab_form(attribute: str | None, text: str) -> tuple[str | None, str | None]:
    """(value, form) of a ShapeWorld expression written out by hand, or (None, None)."""
    if attribute is None:
        return None, None
    from trce.shapeworld import world
    from trce.shapeworld.lexicon import language

    v = world.vocab()
    for value in v.values(attribute):
        for form in world.FORMS:
            if text in v.expressions(attribute, value, form, "all"):
                return value, form
        if attribute == "color" and text in language().objects(value):
            return value, "object"
    return None, None


def _templates(r: _Reader, raw: Any, shapeworld: bool) -> tuple[str, ...]:
    if raw == "from-world":
        if not shapeworld:
            raise r.fail("templates", "`from-world` needs `attribute` and `value` (ShapeWorld specs)")
        from trce.shapeworld import world

        return tuple(world.vocab().templates)
    templates = r.strings(raw, "templates")
    if not templates:
        raise r.fail("templates", "must list at least one template")
    for i, t in enumerate(templates):
        if shapeworld:
            if "{np}" not in t:
                raise r.fail(f"templates[{i}]", f"must contain the world's {{np}} slot, got {t!r}")
            continue
        slots = _SLOT.findall(t)
        if len(slots) != 1 or t.count("{") != 1:
            raise r.fail(f"templates[{i}]", f"must contain exactly one {{}} or {{concept}} slot, got {t!r}")
    return templates


def _preservation(r: _Reader, raw: Any, attribute: str | None, base_dir: Path | None) -> Preservation:
    if raw in (None, "none"):
        return Preservation("none")
    if isinstance(raw, str):
        raw = {"source": raw}
    raw = r.mapping(raw, "preserve", ("source", "prompts", "file", "column", "n", "seed"))
    source = r.string(raw.get("source", "prompts" if "prompts" in raw else "file" if "file" in raw else ""),
                      "preserve.source")
    if source not in SOURCES:
        close = difflib.get_close_matches(source, SOURCES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise r.fail("preserve.source", f"is {source!r}{hint}; choose from {', '.join(SOURCES)}")
    n = r.integer(raw["n"], "preserve.n", low=1) if "n" in raw else None
    seed = r.integer(raw.get("seed", 0), "preserve.seed")
    prompts: tuple[str, ...] = ()
    file = None
    if source == "prompts":
        prompts = r.strings(raw.get("prompts"), "preserve.prompts")
        if not prompts:
            raise r.fail("preserve.prompts", "must list at least one prompt")
    if source == "file":
        file = r.string(raw.get("file", ""), "preserve.file")
        path = Path(file).expanduser()
        if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
            file = str(base_dir / path)
    if source == "shapeworld-captions" and attribute is None:
        raise r.fail("preserve.source", "`shapeworld-captions` needs `attribute` and `value` (ShapeWorld specs)")
    if source == "shapeworld-captions" and n is None:
        n = 1000
    column = r.string(raw.get("column", "prompt"), "preserve.column")
    return Preservation(source=source, prompts=prompts, file=file, column=column, n=n, seed=seed)


# --------------------------------------------------------------------------- preservation prompts
def data_dir(explicit: str | Path | None = None) -> Path | None:
    """The shared data folder: `explicit`, else $TRCE_DATA, else None."""
    value = explicit if explicit is not None else os.environ.get("TRCE_DATA")
    return Path(value).expanduser() if value else None


def preservation_prompts(spec: ConceptSpec, data: str | Path | None = None) -> list[str]:
    p = spec.preservation
    if p.source == "none":
        return []
    if p.source == "prompts":
        return _subset(list(p.prompts), p.n, p.seed)
    if p.source == "shapeworld-captions":
        from trce.concepts.shapeworld import shapeworld_captions

        return shapeworld_captions(spec.attribute or "", spec.values, p.n or 1000, p.seed)
    if p.source == "coco":
        folder = data_dir(data)
        if folder is None:
            raise TrceError(f"concept {spec.name!r} preserves COCO captions: pass --data DIR (a folder holding "
                            f"{COCO_FILE}) or set TRCE_DATA")
        path = folder / COCO_FILE
        if not path.exists():
            raise TrceError(f"concept {spec.name!r} preserves COCO captions, but {path} does not exist; "
                            "pass --data DIR with a folder holding prompts/coco_30k.csv")
        return _subset(read_prompt_file(path, "prompt"), p.n, p.seed)
    path = Path(p.file or "").expanduser()
    if not path.is_absolute() and not path.exists() and data_dir(data) is not None:
        path = data_dir(data) / path  # type: ignore[operator]
    return _subset(read_prompt_file(path, p.column), p.n, p.seed)


def read_prompt_file(path: str | Path, column: str = "prompt") -> list[str]:
    """Prompts from a CSV file (one column) or a text file (one prompt a line)."""
    path = Path(path)
    if not path.exists():
        raise TrceError(f"preservation prompt file {path} does not exist")
    if path.is_dir():
        raise TrceError(f"preservation prompt file {path} is a folder; give a CSV or TXT file")
    try:
        if path.suffix.lower() != ".csv":
            return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if column not in (reader.fieldnames or []):
                columns = ", ".join(f for f in reader.fieldnames or [] if f)
                raise TrceError(f"{path} has no column {column!r}; columns: {columns}")
            return [row[column].strip() for row in reader if (row.get(column) or "").strip()]
    except UnicodeDecodeError as exc:
        raise TrceError(f"preservation prompt file {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except csv.Error as exc:
        raise TrceError(f"preservation prompt file {path} is not a readable CSV: {exc}") from exc


def _subset(prompts: list[str], n: int | None, seed: int) -> list[str]:
    """A seeded random subset of `n` prompts, in file order (all of them when n is None or larger)."""
    if n is None or n >= len(prompts):
        return prompts
    import numpy as np

    keep = np.sort(np.random.default_rng(seed).choice(len(prompts), size=n, replace=False))
    return [prompts[i] for i in keep]


# --------------------------------------------------------------------------- registry
def builtin_dir() -> Path:
    return Path(str(resources.files("trce.concepts").joinpath("builtin")))


MAX_SPEC_BYTES = 1 << 20  # a spec names prompts and settings; long prompt lists go in a prompt file it names


def read_spec_file(path: str | Path) -> ConceptSpec:
    path = Path(path).expanduser()
    return spec_from_dict(_read_yaml(path), where=str(path), base_dir=path.parent)


def _read_yaml(path: Path) -> Any:
    """The parsed YAML of spec file `path` (a spec, or a base that `extends:` names): a missing, oversized,
    non-UTF-8, invalid or empty file is one error."""
    if not path.exists():
        raise TrceError(f"concept spec file {path} does not exist")
    if path.is_dir():
        raise TrceError(f"concept spec {path} is a folder; give a spec YAML file")
    size = path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise TrceError(f"concept spec {path} is {size / 1e6:.1f} MB; a spec is at most {MAX_SPEC_BYTES >> 20} MB "
                        "(put long prompt lists in a file it names: preserve: {file: ...})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TrceError(f"concept spec {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise TrceError(f"cannot read concept spec {path}: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TrceError(f"concept spec {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if raw is None:
        raise TrceError(f"concept spec {path} is empty; a spec needs at least name, erase and templates")
    return raw


def builtin_specs() -> dict[str, ConceptSpec]:
    """Built-in specs by name (in name order)."""
    specs = [read_spec_file(p) for p in sorted(builtin_dir().glob("*.yaml"))]
    return {s.name: s for s in sorted(specs, key=lambda s: s.name)}


def load_spec(name_or_path: str | Path) -> ConceptSpec:
    """A built-in spec by name or alias, or a spec YAML file by path."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        return read_spec_file(text)
    specs = builtin_specs()
    aliases = {alias: s for s in specs.values() for alias in s.aliases}
    if text in specs:
        return specs[text]
    if text in aliases:
        return aliases[text]
    if Path(text).is_file():
        return read_spec_file(text)
    close = difflib.get_close_matches(text, [*specs, *aliases], n=1)
    if close and close[0] in aliases:  # a typo of an alias ("nudty"): suggest the alias, list the names
        raise TrceError(f"unknown concept {text!r} (did you mean {close[0]!r}?); available: {', '.join(sorted(specs))}")
    return specs[choose("concept", text, specs)]


def concept_yaml(name_or_path: str | Path) -> str:
    """The YAML text of a spec (built-in name, alias or path)."""
    spec = load_spec(name_or_path)
    return Path(spec.source or "").read_text(encoding="utf-8")
