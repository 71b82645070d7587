"""The concept spec YAML format, validated into a `ConceptSpec` (`spec_from_dict`).

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

import difflib
import re
from pathlib import Path
from typing import Any

from trce.concepts.extends import extended
from trce.concepts.model import SLOT, Expression, Preservation
from trce.concepts.reader import TOP_KEYS, Reader
from trce.concepts.sources import SOURCES
from trce.concepts.spec import ConceptSpec
from trce.errors import TrceError


def spec_from_dict(raw: Any, where: str = "<dict>", base_dir: Path | None = None) -> ConceptSpec:
    """Validate a parsed YAML mapping into a `ConceptSpec` (errors name the bad field and `where`)."""
    r = Reader(where)
    raw = r.mapping(raw, "", TOP_KEYS)
    if "extends" in raw:
        top = Path(where).resolve() if base_dir is not None and Path(where).is_file() else None
        raw = extended(r, raw, base_dir, (top,) if top is not None else ())
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


def _settings(r: Reader, raw: Any, key: str = "settings") -> dict:
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


def _family_settings(r: Reader, raw: Any) -> dict:
    """`family_settings: {sdxl: {V: {...}}}`: per model family (see `trce.families`), settings as in `settings`."""
    from trce.families import family_names

    raw = r.mapping(raw, "family_settings", tuple(family_names()))
    return {fam: _settings(r, values, f"family_settings.{fam}") for fam, values in raw.items()}


def _family_targets(r: Reader, raw: Any, key: str) -> tuple[tuple[str, str], ...]:
    """`family_targets: {sd3: blue}`: the group's safe text on those model families (see `trce.families`)."""
    from trce.families import family_names

    raw = r.mapping(raw, key, tuple(family_names()))
    return tuple((fam, r.string(text, f"{key}.{fam}", allow_empty=True)) for fam, text in raw.items())


def _shapeworld_target(r: Reader, raw: dict) -> tuple[str, tuple[str, ...]]:
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


def _expressions(r: Reader, raw: Any, attribute: str | None, values: tuple[str, ...]) -> tuple[Expression, ...]:
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
            if SLOT.search(text) or "{" in text or "}" in text:
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


def _from_vocab(r: Reader, key: str, attribute: str, values: tuple[str, ...], forms: tuple[str, ...], target: str,
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


def _templates(r: Reader, raw: Any, shapeworld: bool) -> tuple[str, ...]:
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
        slots = SLOT.findall(t)
        if len(slots) != 1 or t.count("{") != 1:
            raise r.fail(f"templates[{i}]", f"must contain exactly one {{}} or {{concept}} slot, got {t!r}")
    return templates


def _preservation(r: Reader, raw: Any, attribute: str | None, base_dir: Path | None) -> Preservation:
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
