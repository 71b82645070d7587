"""Evaluation suites: YAML data naming prompts, a detector, metrics and generation defaults.

Two kinds live in `trce/eval/suites/*.yaml`:

- `real` suites read a public prompt file (I2P, MMA-Diffusion, P4D, ...). The file comes from
  `--data` (the file itself or a folder holding it), a folder in `$TRCE_DATA`, trce's data cache
  (`$TRCE_CACHE/data`, default ~/.cache/trce/data), or, where the suite names one, a Hugging Face
  dataset when online (saved to that cache); otherwise the error says where to put it.
- `shapeworld` suites are generated from `trce/shapeworld/vocab.yaml` and `language.yaml`: for an erased
  attribute and value(s) they draw fixed-seed prompts in these groups, in the world's grammar (the 12 templates)
    keyword     the spec's own expressions: the keyword, its `spec` synonyms and paraphrases;
    synonym     held-out single words (`heldout` synonyms) the eraser never saw;
    paraphrase  held-out multi-word descriptions (`heldout` paraphrases);
    preserve    every other value of the same attribute, by keyword;
    unrelated   prompts that do not name the attribute at all (every other attribute by keyword),
                so their concept rate is the model's spontaneous rate, about 1/|values| originally.
  Every other attribute is named by keyword with a random value. The same erasure groups and `preserve` come
  again in the open language's HELD-OUT constructions, frames, openings, closings and writing
  (`keyword-open`, `synonym-open`, `paraphrase-open`, `preserve-open`; see `_open_row`): what an eraser
  does on prompts no spec resembles. Row i of a group depends only on (suite seed, group, i), so `--limit`
  keeps a prefix and different runs share prompts and seeds.

Either kind may carry an optional `report:` mapping, how `trce report` shows the suite (presentation only: it
changes no prompt, image or number; `trce eval` copies it into metrics.json as `suite_label`, `suite_group` and
`suite_order`):
    label   the short column name in report tables (default: the suite name), e.g. `I2P`;
    group   `user` (prompts people type) or `adversarial` (attack prompts): the real-suite table's column
            group, and the adversarial suites' mean ASR is its "Adv" column; omitted: "Other suites"
            (preservation suites without a detector, such as coco-3k, and ShapeWorld suites need none);
    order   an integer, the column's place among real suites (lower first; the built-ins use 10-60 in the
            order of the TRCE paper's Table 1); omitted: after those that give one, in the order of the runs.
  e.g.  report: {label: I2P, group: user, order: 10}
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

from trce.errors import TrceError, choose
from trce.eval.prompts import LAYOUTS, PromptRow, load_prompts

log = logging.getLogger(__name__)

Kind = Literal["real", "shapeworld"]
SHAPEWORLD_GROUPS = ("keyword", "synonym", "paraphrase", "preserve", "unrelated",
                     "keyword-open", "synonym-open", "paraphrase-open", "preserve-open")
# prompts that ask for the erased value: in the world's grammar, and in the open language's held-out constructions
ERASURE_GROUPS = ("keyword", "synonym", "paraphrase", "keyword-open", "synonym-open", "paraphrase-open")
OPEN_GROUPS = ("keyword-open", "synonym-open", "paraphrase-open", "preserve-open")
_GROUP_STRIDE = 100_000  # seeds of group g are seed * 10^6 + g * 10^5 + i, so n per group is capped here
SUITE_GROUPS = ("user", "adversarial")  # values of a suite's report.group


@dataclass(frozen=True)
class Defaults:
    steps: int = 30
    guidance: float = 7.5
    size: int | None = None
    seed: int = 0  # first seed for rows whose file gives none (row i gets seed + i)
    limit: int | None = None
    batch_size: int = 8


@dataclass(frozen=True)
class Presentation:
    """How `trce report` shows a suite: the `report:` mapping of a suite file (see the module docstring)."""

    label: str | None = None  # short column name; None: the suite name
    group: str | None = None  # one of SUITE_GROUPS, or None ("Other suites")
    order: int | None = None  # column order among real suites (lower first); None: after those with one


@dataclass(frozen=True)
class Suite:
    name: str
    version: str
    kind: Kind
    description: str
    detector: str
    metrics: tuple[str, ...] = ()
    defaults: Defaults = field(default_factory=Defaults)
    note: str | None = None
    report: Presentation = field(default_factory=Presentation)
    # real suites
    file: str | None = None
    layout: str = "auto"
    columns: dict = field(default_factory=dict)
    default_category: str | None = None
    category: str | None = None  # keep only rows tagged with this category
    hf: dict | None = None  # {repo, file, columns?, category?}
    # ShapeWorld suites
    attribute: str | None = None
    values: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    n: int = 200
    seed: int = 0
    path: str | None = None  # where the definition was read from

    def rows(self, data: str | Path | None = None, limit: int | None = None) -> list[PromptRow]:
        """The suite's prompts; `limit` caps real suites' rows and ShapeWorld suites' rows per group."""
        if limit is not None and limit < 1:
            raise TrceError(f"--limit must be at least 1, got {limit}")
        if self.kind == "shapeworld":
            return shapeworld_rows(self, limit)
        path = find_data(self, data)
        rows = load_prompts(path, self.layout, self.columns or None, self.default_category)
        if self.category is not None:
            rows = [r for r in rows if self.category in r.categories]
        limit = limit if limit is not None else self.defaults.limit
        return rows[:limit] if limit is not None else rows

    def presentation(self) -> dict:
        """The presentation record `trce eval` writes into metrics.json (and `trce report` reads back)."""
        return {"suite_label": self.report.label or self.name, "suite_group": self.report.group,
                "suite_order": self.report.order}

    def summary(self) -> dict:
        """One line of `trce suites`."""
        if self.kind == "shapeworld":
            prompts = f"{self.n}/group x {len(self.groups)}"
            source = f"vocab.yaml: {self.attribute}={'+'.join(self.values)}"
        else:
            prompts = ""
            source = self.file or ""
        return {"name": self.name, "version": self.version, "kind": self.kind, "detector": self.detector,
                "prompts": prompts, "source": source, "description": self.description}


def _suite_dir():
    return resources.files("trce.eval").joinpath("suites")


def builtin_suites() -> dict[str, Any]:
    """name -> resource of every built-in suite definition."""
    out = {}
    for entry in _suite_dir().iterdir():
        if entry.name.endswith(".yaml"):
            out[entry.name[: -len(".yaml")]] = entry
    return dict(sorted(out.items()))


def parse_suite(raw: dict, where: str) -> Suite:
    """Validate a suite definition (a parsed YAML mapping); mistakes name the field and the file."""
    if not isinstance(raw, dict):
        raise TrceError(f"suite file {where} must hold a mapping, got {type(raw).__name__}")
    known = {"name", "version", "kind", "description", "detector", "metrics", "defaults", "note", "report", "source",
             "layout", "columns", "default_category", "category", "attribute", "values", "groups", "n", "seed"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise TrceError(f"suite file {where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for key in ("name", "kind", "detector"):
        if key not in raw:
            raise TrceError(f"suite file {where}: missing field {key!r}")
    kind = raw["kind"]
    if kind not in ("real", "shapeworld"):
        raise TrceError(f"suite file {where}: kind must be 'real' or 'shapeworld', got {kind!r}")
    d = raw.get("defaults") or {}
    bad = sorted(set(d) - set(Defaults.__dataclass_fields__))
    if bad:
        raise TrceError(f"suite file {where}: unknown defaults {', '.join(bad)}")
    common: dict[str, Any] = {
        "name": str(raw["name"]), "version": str(raw.get("version", "1")), "kind": kind,
        "description": str(raw.get("description", "")).strip(), "detector": str(raw["detector"]),
        "metrics": tuple(raw.get("metrics") or ()), "defaults": Defaults(**d), "note": raw.get("note"),
        "report": _parse_presentation(raw.get("report"), where), "path": where,
    }
    if kind == "real":
        source = raw.get("source") or {}
        if not source.get("file"):
            raise TrceError(f"suite file {where}: a real suite needs source.file")
        layout = raw.get("layout", "auto")
        if layout != "auto":
            choose("prompt layout", layout, LAYOUTS)
        return Suite(**common, file=source["file"], hf=source.get("hf"), layout=layout,
                     columns=dict(raw.get("columns") or {}), default_category=raw.get("default_category"),
                     category=raw.get("category"))
    from trce.shapeworld import world

    attribute = raw.get("attribute")
    if attribute not in world.ATTRIBUTES:
        raise TrceError(f"suite file {where}: attribute must be one of {', '.join(world.ATTRIBUTES)}, got {attribute!r}")
    values = tuple(raw.get("values") or ())
    allowed = world.vocab().values(attribute)
    if not values:
        raise TrceError(f"suite file {where}: a ShapeWorld suite needs values (the erased {attribute} values)")
    for v in values:
        choose(f"{attribute} value", v, allowed)
    if len(values) >= len(allowed):
        raise TrceError(f"suite file {where}: erasing every {attribute} leaves nothing to preserve")
    groups = tuple(raw.get("groups") or SHAPEWORLD_GROUPS)
    for g in groups:
        choose("ShapeWorld prompt group", g, SHAPEWORLD_GROUPS)
    n = int(raw.get("n", 200))
    if not 1 <= n < _GROUP_STRIDE:
        raise TrceError(f"suite file {where}: n must be between 1 and {_GROUP_STRIDE - 1}, got {n}")
    return Suite(**common, attribute=attribute, values=values, groups=groups, n=n, seed=int(raw.get("seed", 0)))


def _parse_presentation(raw: Any, where: str) -> Presentation:
    """The optional `report:` mapping (label, group, order), each mistake naming the field."""
    if raw is None:
        return Presentation()
    if not isinstance(raw, dict):
        raise TrceError(f"suite file {where}: report must be a mapping (label, group, order), got {type(raw).__name__}")
    known = Presentation.__dataclass_fields__
    bad = sorted(set(raw) - set(known))
    if bad:
        raise TrceError(f"suite file {where}: unknown report field(s) {', '.join(map(str, bad))}; known: "
                        f"{', '.join(known)}")
    label, group, order = raw.get("label"), raw.get("group"), raw.get("order")
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise TrceError(f"suite file {where}: report.label must be a non-empty string, got {label!r}")
    if group is not None and group not in SUITE_GROUPS:
        raise TrceError(f"suite file {where}: report.group must be one of {', '.join(SUITE_GROUPS)} (or left out), "
                        f"got {group!r}")
    if order is not None and (isinstance(order, bool) or not isinstance(order, int)):
        raise TrceError(f"suite file {where}: report.order must be an integer, got {order!r}")
    return Presentation(label=label.strip() if label is not None else None, group=group, order=order)


def load_suite(name: str) -> Suite:
    """A built-in suite by name, or a suite YAML file by path."""
    path = Path(name).expanduser()
    if name.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise TrceError(f"suite file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise TrceError(f"suite file {path} is not valid YAML: {exc}") from exc
        return parse_suite(raw, str(path))
    available = builtin_suites()
    choose("suite", name, available)
    return parse_suite(yaml.safe_load(available[name].read_text(encoding="utf-8")), f"{name}.yaml (built-in)")


def list_suites() -> list[Suite]:
    return [load_suite(name) for name in builtin_suites()]


def find_data(suite: Suite, data: str | Path | None) -> Path:
    """The local prompt file of a real suite (see the module docstring for where it is looked for)."""
    assert suite.file is not None
    if data is not None:
        p = Path(data).expanduser()
        if p.is_file():
            return p
        if p.is_dir():
            if (p / suite.file).is_file():
                return p / suite.file
            raise TrceError(f"suite {suite.name} needs {suite.file}, which is not in --data folder {p}")
        raise TrceError(f"--data {p} does not exist (give the file {suite.file} or the folder holding it)")
    for folder in [*filter(None, os.environ.get("TRCE_DATA", "").split(os.pathsep)), _data_cache()]:
        if (Path(folder) / suite.file).is_file():
            return Path(folder) / suite.file
    hint = ""
    if suite.hf:
        got = _from_hub(suite)
        if got is not None:
            return got
        hint = f" (the Hugging Face dataset {suite.hf['repo']} could not be reached)"
    raise TrceError(
        f"suite {suite.name} needs the prompt file {suite.file}{hint}: pass --data PATH (the file or the folder "
        f"holding it), or put it in a folder listed in $TRCE_DATA"
    )


def _data_cache() -> Path:
    """Where prompt files downloaded from the hub are kept, in the suite's own layout."""
    return Path(os.environ.get("TRCE_CACHE", "~/.cache/trce")).expanduser() / "data"


def _from_hub(suite: Suite) -> Path | None:
    """Download the suite's file from the HF hub and write it in the suite's own layout, or None."""
    import csv

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return None
    try:
        from huggingface_hub import hf_hub_download

        raw = Path(hf_hub_download(suite.hf["repo"], suite.hf["file"], repo_type="dataset"))  # type: ignore[index]
    except Exception as exc:  # noqa: BLE001 (network, auth and missing-file errors come as many types)
        log.info("could not download %s from the hub: %s", suite.file, exc)
        return None
    rows = load_prompts(raw, "csv", dict(suite.hf.get("columns") or {}))  # type: ignore[union-attr]
    if suite.hf.get("category"):  # type: ignore[union-attr]
        rows = [r for r in rows if suite.hf["category"] in r.categories]  # type: ignore[index]
    from trce.utils import io

    dest = _data_cache() / suite.file
    with io.atomic_path(dest) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "categories", "evaluation_seed", "evaluation_guidance", "case_number"])
        for i, r in enumerate(rows):
            w.writerow([r.prompt, ", ".join(r.categories), r.seed if r.seed is not None else "",
                        r.guidance if r.guidance is not None else "", r.case_number if r.case_number is not None else i])
    return dest


# --------------------------------------------------------------------------- ShapeWorld prompts
def _shapeworld_row(suite: Suite, group: str, i: int) -> PromptRow:
    from trce.shapeworld import world

    v = world.vocab()
    a = suite.attribute
    assert a is not None
    g = SHAPEWORLD_GROUPS.index(group)
    rng = np.random.default_rng([suite.seed, g, i])
    if group in OPEN_GROUPS:
        return _open_row(suite, group, i, g, rng)
    keyword = (1.0, 0.0, 0.0)
    forms: dict[str, tuple[float, ...]] = {attr: keyword for attr in world.ATTRIBUTES}
    mention = {attr: 1.0 for attr in world.ATTRIBUTES}
    expr_group, form, value = "heldout", "keyword", None
    if group in ERASURE_GROUPS:
        value = suite.values[i % len(suite.values)]
        # keyword: cycle the spec's own forms (keyword, spec synonyms, spec paraphrases)
        form = world.FORMS[(i // len(suite.values)) % 3] if group == "keyword" else group
        expr_group = "spec" if group == "keyword" else "heldout"
        forms[a] = tuple(1.0 if f == form else 0.0 for f in world.FORMS)
    elif group == "preserve":
        others = [x for x in v.values(a) if x not in suite.values]
        value = others[i % len(others)]
    else:  # unrelated: the attribute is not named
        mention[a] = 0.0
    scene = world.sample_scene(rng, **({a: value} if value is not None else {}))
    style = world.CaptionStyle(forms=forms, mention=mention, group=expr_group)
    with_bg = [t for t in v.templates if "{bg}" in t]
    without_bg = [t for t in v.templates if "{bg}" not in t]
    pool = without_bg if (a == "background" and group == "unrelated") else with_bg
    template = pool[int(rng.integers(len(pool)))]
    text, named = world.describe(scene, rng, style, template)
    return PromptRow(
        prompt=text,
        seed=suite.seed * 1_000_000 + g * _GROUP_STRIDE + i,
        categories=(group,),
        case_number=i,
        extra={"group": group, "attribute": a, "value": value, "form": form if value is not None else None,
               "named": {attr: scene.attribute(attr) for attr in named}},
    )


def _open_row(suite: Suite, group: str, i: int, g: int, rng: np.random.Generator) -> PromptRow:
    """A prompt of a held-out-template group: the open language's held-out constructions, frames, openings,
    closings and writing (`trce.shapeworld.language`), every attribute named.

    keyword-open     the spec's own words (keyword, spec synonyms, spec paraphrases, spec objects), cycled
    synonym-open     held-out synonyms
    paraphrase-open  held-out paraphrases and, for colours, held-out objects, alternately
    preserve-open    every other value of the attribute, by keyword
    """
    from trce.shapeworld import world
    from trce.shapeworld.language import OpenStyle, draft, expressions

    a = suite.attribute
    base = group.removesuffix("-open")
    if base == "preserve":
        others = [x for x in world.vocab().values(a) if x not in suite.values]
        value, form, words = others[i % len(others)], "keyword", "heldout"
    else:
        value = suite.values[i % len(suite.values)]
        k = i // len(suite.values)
        if base == "keyword":
            own = [*world.FORMS, "object"] if a == "color" else list(world.FORMS)
            form, words = own[k % len(own)], "spec"
        elif base == "synonym":
            form, words = "synonym", "heldout"
        else:
            form = "object" if a == "color" and k % 2 else "paraphrase"
            words = "heldout"
    expr = expressions(a, value, form, words)
    expr = expr[int(rng.integers(len(expr)))]
    scene = world.sample_scene(rng, **{a: value})
    keyword = {"keyword": 1.0}
    style = OpenStyle(group="heldout", words="heldout", mention={attr: 1.0 for attr in world.ATTRIBUTES},
                      forms={attr: keyword for attr in world.ATTRIBUTES})
    d = draft(scene, rng, style, slot=a, slot_expr=(form, expr))
    text, _ = d.render(d.slot_text())
    return PromptRow(
        prompt=text,
        seed=suite.seed * 1_000_000 + g * _GROUP_STRIDE + i,
        categories=(group,),
        case_number=i,
        extra={"group": group, "attribute": a, "value": value, "form": form, "expression": expr,
               "named": {attr: scene.attribute(attr) for attr in d.named}},
    )


def shapeworld_rows(suite: Suite, limit: int | None = None) -> list[PromptRow]:
    """The suite's prompts, group by group; row i of a group is the same for every n >= i."""
    n = min(suite.n, limit) if limit is not None else suite.n
    return [_shapeworld_row(suite, group, i) for group in suite.groups for i in range(n)]
