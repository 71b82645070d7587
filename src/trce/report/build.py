"""`build_report`: read `trce eval` run folders and summarise them as one JSON document.

Everything the report shows is decided here, JSON first; `tables.render_markdown`, `plot.asr_preservation_plot`
and `html.render_html` only draw that JSON (the HTML also reads the image files it names).

The document holds
    header   suites, models, dates, git hashes and library versions of the runs;
    runs     one entry per run folder (label, suite, settings, headline numbers);
    tables   one per ShapeWorld suite and one for all real suites, shaped like the TRCE paper's Table 1:
             rows are models/patches (the original model first), runs of different suites on the same
             model + patch share a row; every cell keeps the run it came from. A real suite's column label,
             column group (user / adversarial prompts) and place come from its suite definition's `report:`
             mapping, which `trce eval` copies into metrics.json (`suite_label`, `suite_group`, `suite_order`;
             see `suite_presentation`);
    plot     ASR-vs-preservation panels, one point per table row;
    grids    before/after image pairs on the same prompts and seeds, N prompts per group picked
             deterministically (evenly spaced over the group's rows);
    attacks  red-team runs (metrics.json "attack"), with their label ("knowledge left" for soft prompts);
    bases    the base models of the runs (metrics.json `base_fingerprint`, else `model`): every run belongs to one.
             Runs of different bases never compete: each base has its own original row (its baseline), the best
             value is bolded per column within a base, the plot measures each row against its own base's original,
             and with several bases every row names its base;
    robustness  with attack runs: one table, rows = model/patch (and suite), columns = the plain ASR of its eval
             run on the attacked suite, the ASR after each attack, the eval run's preservation accuracy and the
             hardening's seconds per round (the patch's info); the same table shape as `tables`, so the
             Markdown and HTML draw it as they draw those (None without attack runs).
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from trce.errors import TrceError

log = logging.getLogger(__name__)

REPORT_FORMAT = "trce-report"
REPORT_VERSION = 1
REQUIRED_KEYS = ("suite", "kind", "n", "asr")

# The ShapeWorld suites' groups (trce.eval.suites): the -open ones are the open language's held-out templates.
ERASURE_GROUPS = ("keyword", "synonym", "paraphrase", "keyword-open", "synonym-open", "paraphrase-open")
PRESERVATION_GROUPS = ("preserve", "unrelated", "preserve-open")
PRESERVED_ATTRIBUTES = ("color", "shape")  # shown besides the erased attribute (the paper-style table stays narrow)

# the attacks in the order the robustness table shows them (others follow, by name)
ATTACK_ORDER = ("ring-a-bell", "mma-text", "unlearndiff", "soft-prompt")

# a suite's report.group -> the real-suite table's column group, in the order the groups are shown
GROUP_TITLES = {"user": "User prompts", "adversarial": "Adversarial prompts", None: "Other suites"}


# --------------------------------------------------------------------------- reading runs
def load_metrics(folder: str | os.PathLike) -> tuple[Path, dict]:
    """(run folder, its metrics.json), with one clear error naming the folder when it is not a finished eval run."""
    folder = Path(folder)
    if folder.is_file() and folder.name == "metrics.json":
        folder = folder.parent
    if not folder.exists():
        raise TrceError(f"{folder}: no such run folder")
    if not folder.is_dir():
        raise TrceError(f"{folder} is not a run folder (give the folder `trce eval --out` wrote)")
    path = folder / "metrics.json"
    if not path.is_file():
        raise TrceError(f"{folder} has no metrics.json: not a `trce eval` output folder, or its run has not finished")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrceError(f"corrupt metrics.json in {folder}: {exc}") from exc
    if not isinstance(metrics, dict):
        raise TrceError(f"{path} is not a trce eval metrics file (a JSON object is expected)")
    missing = [k for k in REQUIRED_KEYS if k not in metrics]
    if missing:
        raise TrceError(f"{path} is not a trce eval metrics file (no {', '.join(missing)})")
    if metrics["kind"] not in ("shapeworld", "real"):
        raise TrceError(f"{path}: unknown kind {metrics['kind']!r} (expected shapeworld or real)")
    if metrics["kind"] == "shapeworld" and not isinstance(metrics.get("groups"), dict):
        raise TrceError(f"{path}: a ShapeWorld metrics file needs its per-group numbers (\"groups\")")
    return folder, metrics


def read_rows(path: Path) -> list[dict]:
    """The complete JSON lines of a rows.jsonl (missing file: none; a line cut short by a kill is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def suite_presentation(metrics: dict) -> dict:
    """{"label", "group", "order"} of a run's suite: from its metrics.json (`suite_label`, `suite_group`,
    `suite_order`, written by `trce eval` since suites carry them); for older metrics files, from the built-in
    suite definition of that name; failing that, the suite name and no group or order."""
    name = str(metrics["suite"])
    if "suite_label" in metrics:
        label, group, order = metrics.get("suite_label"), metrics.get("suite_group"), metrics.get("suite_order")
    else:
        label, group, order = _builtin_presentation(name)
    return {"label": str(label) if label else name, "group": group if group in GROUP_TITLES else None,
            "order": order if isinstance(order, int) and not isinstance(order, bool) else None}


@functools.cache
def _builtin_presentation(name: str) -> tuple:
    """(label, group, order) of the built-in suite `name`, or Nones when there is none or it does not load."""
    from trce.eval import suites

    try:
        if name in suites.builtin_suites():  # built-ins only: a suite name is never read as a file path here
            p = suites.load_suite(name).presentation()
            return p["suite_label"], p["suite_group"], p["suite_order"]
    except Exception as exc:  # noqa: BLE001 (a report of old runs must not fail on a suite that changed since)
        log.debug("no presentation for suite %s: %s", name, exc)
    return None, None, None


def _patch_stages(patch: str | None) -> list[str] | None:
    """TRCE-style stage list ("T", "V") from the patch folder's patch.json, when it is still there."""
    meta = _patch_meta(patch)
    if meta is None:
        return None
    settings = meta.get("settings") or {}
    stages = settings.get("stages") or ([settings["stage"]] if isinstance(settings.get("stage"), str) else None)
    return [str(s) for s in stages] if isinstance(stages, list) and stages else None


def run_label(metrics: dict) -> str:
    """"Original (model)" for the model alone; the method's name (with its stages) for a patch."""
    if metrics.get("label"):
        return str(metrics["label"])
    if not metrics.get("patch"):
        without = retrained_without(metrics.get("model"))
        base = (f"Retrained without {without} ({metrics['model']})" if without
                else f"Original ({metrics.get('model') or 'model'})")
    else:
        method = metrics.get("method")
        stages = metrics.get("stages") or _patch_stages(metrics["patch"])
        if method:
            from trce.registry import display_name

            base = display_name(str(method), stages)  # the registry's name: "TRCE (T+V)", "UCE"
        else:
            base = Path(str(metrics["patch"])).name
        if metrics.get("hidden_prompt"):
            base += " + hidden prompt"
    attack = metrics.get("attack")
    if isinstance(attack, dict) and attack.get("name"):
        base += f" + {attack_display(attack)}"
    return base


def attack_display(attack: dict) -> str:
    """An attack run's name as tables show it ("unlearndiff", "unlearndiff (fast preset)"): `record_label`."""
    from trce.attacks.base import record_label

    return record_label(attack)


@functools.lru_cache(maxsize=64)
def retrained_without(model: str | None) -> str | None:
    """"color=red" when `model` is a local ShapeWorld export trained with `--exclude color=red` (its made.json): the
    retrained reference, labelled so, not as the original the patches were made from; None otherwise."""
    made = Path(str(model)) / "made.json" if model else None
    if made is None or not made.is_file():
        return None
    try:
        config = json.loads(made.read_text(encoding="utf-8")).get("config") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return str(config.get("exclude") or "") or None


def _row_key(metrics: dict, base: str | None = None) -> tuple:
    patch = metrics.get("patch")
    attack = metrics.get("attack") if isinstance(metrics.get("attack"), dict) else {}
    return (base, metrics.get("model"), os.path.realpath(patch) if patch else None,
            metrics.get("method") if patch else None, attack_display(attack) if attack.get("name") else None,
            bool(metrics.get("hidden_prompt")))


def assign_bases(metrics: Sequence[dict]) -> tuple[list[str], list[dict]]:
    """The base model of each run, and the bases in order of first appearance.

    A run's base is its `base_fingerprint` (the unedited model's weights, which `trce eval` records); a run without
    one (older metrics) joins the base its `model` has when that model names exactly one fingerprint, else its base is
    the model name. Returns (a key per run, [{"key", "label", "models", "fingerprint"}]); a base's label is its model
    name(s), with the fingerprint's first characters when two bases would read the same."""
    fps: dict[str, set[str]] = {}
    for m in metrics:
        fp = m.get("base_fingerprint")
        if isinstance(fp, str) and fp:
            fps.setdefault(str(m.get("model")), set()).add(fp)
    keys = []
    for m in metrics:
        fp, model = m.get("base_fingerprint"), str(m.get("model"))
        if isinstance(fp, str) and fp:
            keys.append(f"fingerprint:{fp}")
        elif len(fps.get(model, ())) == 1:
            keys.append(f"fingerprint:{next(iter(fps[model]))}")
        else:
            keys.append(f"model:{model}")
    bases: list[dict] = []
    for key, m in zip(keys, metrics):
        base = next((b for b in bases if b["key"] == key), None)
        if base is None:
            fp = key.split(":", 1)[1] if key.startswith("fingerprint:") else None
            base = {"key": key, "label": "", "models": [], "fingerprint": fp}
            bases.append(base)
        if m.get("model") is not None and str(m["model"]) not in base["models"]:
            base["models"].append(str(m["model"]))
    for b in bases:
        b["label"] = " / ".join(b["models"]) or "unknown model"
    labels = [b["label"] for b in bases]
    for b in bases:
        if b["fingerprint"] and labels.count(b["label"]) > 1:
            b["label"] += f" [{b['fingerprint'][:8]}]"
    labels = [b["label"] for b in bases]
    for label in dict.fromkeys(labels):  # still the same (one model, a base without a fingerprint): number them
        same = [b for b in bases if b["label"] == label]
        if len(same) > 1:
            for i, b in enumerate(same, 1):
                b["label"] += f" #{i}"
    return keys, bases


def _is_original(metrics: dict) -> bool:
    return not metrics.get("patch") and not metrics.get("attack")


def _run_entry(i: int, folder: Path, m: dict, base: dict | None = None) -> dict:
    s = m.get("settings") or {}
    return {
        "id": f"run{i}", "folder": str(folder.resolve()), "name": folder.resolve().name, "label": run_label(m),
        "base": base["key"] if base else None, "base_label": base["label"] if base else None,
        "suite": m["suite"], "suite_version": m.get("suite_version"), "kind": m["kind"],
        "description": m.get("description"), "note": m.get("note"),
        "model": m.get("model"), "patch": m.get("patch"), "method": m.get("method"), "original": _is_original(m),
        "attack": m.get("attack"), "n": m.get("n"), "asr": m.get("asr"), "asr_ci": m.get("asr_ci"),
        "asr_mean": m.get("asr_mean"), "asr_std": m.get("asr_std"),
        "fd": m.get("fd"), "fid": m.get("fid", m.get("fd") if m["kind"] == "real" else None),
        "clip_score": m.get("clip_score"), "esr": m.get("esr"), "esr_ci": m.get("esr_ci"), "psr": m.get("psr"),
        "psr_ci": m.get("psr_ci"), "groups": m.get("groups"), "by_category": m.get("by_category"),
        "reference": m.get("reference"), "detector": m.get("detector") or {},
        "settings": {k: s.get(k) for k in ("steps", "guidance", "size", "seeds", "limit", "batch_size",
                                           "per_prompt_guidance") if k in s},
        "date": m.get("date"), "git_hash": m.get("git_hash"), "versions": m.get("versions") or {},
        "notes": [v for k in ("fid_note", "clip_score_note") if (v := m.get(k))],
    }


# --------------------------------------------------------------------------- tables
def _cell(value, ci=None, n=None, run: str | None = None, derived: bool = False) -> dict:
    cell = {"value": None if value is None else float(value), "ci": list(ci) if ci else None, "n": n, "run": run}
    if derived:
        cell["derived"] = True
    return cell


class _Rows:
    """Table rows keyed by (model, patch, method, attack); a second run of a suite already in a row opens a new row."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def row_for(self, run: dict, metrics: dict, suite: str) -> dict:
        key = _row_key(metrics, run.get("base"))
        for row in self.rows:
            if row["_key"] == key and suite not in row["_suites"]:
                break
        else:
            row = {"_key": key, "_suites": set(), "label": run["label"], "original": run["original"],
                   "base": run.get("base"), "base_label": run.get("base_label"),
                   # a check, not an eraser: the KPOP patch with its hidden prompt put back
                   "diagnostic": bool(metrics.get("hidden_prompt")),
                   "model": run["model"], "patch": run["patch"], "runs": [], "cells": {}}
            self.rows.append(row)
        row["_suites"].add(suite)
        if run["id"] not in row["runs"]:
            row["runs"].append(run["id"])
        return row

    def finish(self, runs_by_id: dict) -> list[dict]:
        rows = _by_base(self.rows)
        _name_bases(rows)  # before telling two rows of one label apart: two bases are told apart by name
        labels = [r["label"] for r in rows]
        for r in rows:  # two patches of one method: tell them apart by folder
            if labels.count(r["label"]) > 1:
                if r["patch"]:
                    r["label"] += f" · {Path(os.path.realpath(str(r['patch']))).name}"
                elif r["runs"]:
                    r["label"] += f" · {runs_by_id[r['runs'][0]]['name']}"
        for r in rows:
            del r["_key"], r["_suites"]
        return rows


def _by_base(rows: list[dict]) -> list[dict]:
    """Rows grouped by base model (bases in order of first appearance), each base's original rows first."""
    bases = list(dict.fromkeys(r.get("base") for r in rows))
    return [r for b in bases for original in (True, False) for r in rows
            if r.get("base") == b and bool(r["original"]) == original]


def _name_bases(rows: list[dict]) -> bool:
    """With rows of several base models, each row's label names its base (unless it already ends with it: "Original
    (model)"); returns whether there were several."""
    if len({r.get("base") for r in rows}) < 2:
        return False
    for r in rows:
        label = r.get("base_label")
        if label and f"({label})" not in r["label"]:
            r["label"] += f" · {label}"
    return True


def _mark_best(table: dict) -> None:
    """Bold the best patched value per column and base model (lower ASR/FD, higher accuracy/CLIP), when two or
    more of the base's rows compete; the original model and diagnostic rows (a hidden prompt put back) do not
    compete, nor do rows of different base models."""
    for col in table["columns"]:
        better = col.get("better")
        if better not in ("lower", "higher"):
            continue
        for base in dict.fromkeys(r.get("base") for r in table["rows"]):
            cells = [r["cells"].get(col["key"]) for r in table["rows"]
                     if r.get("base") == base and not r["original"] and not r.get("diagnostic")]
            cells = [c for c in cells if c and c.get("value") is not None]
            if len(cells) < 2:
                continue
            values = [c["value"] for c in cells]
            if max(values) - min(values) <= 1e-12:
                continue  # a tie across the board singles nothing out
            best = min(values) if better == "lower" else max(values)
            for c in cells:
                c["best"] = abs(c["value"] - best) <= 1e-12


def _shapeworld_table(suite: str, items: list[tuple[dict, dict]], runs_by_id: dict) -> dict:
    first = items[0][1]
    detector = next((m.get("detector") for _, m in items if m.get("detector")), {}) or {}
    attribute = detector.get("attribute")
    values = detector.get("values") or []
    group_names = list(dict.fromkeys(g for _, m in items for g in m.get("groups", {})))
    asr_groups = first.get("asr_groups") or [g for g in ERASURE_GROUPS if g in group_names]
    columns = [{"key": f"asr.{g}", "label": g, "short": f"ASR {g}", "group": "ASR ↓", "kind": "rate",
                "better": "lower"} for g in asr_groups]
    order = ([attribute] if attribute else []) + [a for a in PRESERVED_ATTRIBUTES if a != attribute]
    acc_cols = []
    for g in PRESERVATION_GROUPS:
        for a in order:
            if any(a in ((m.get("groups") or {}).get(g, {}).get("accuracy") or {}) for _, m in items):
                acc_cols.append((g, a))
                columns.append({"key": f"acc.{g}.{a}", "label": f"{g} · {a}", "short": f"acc {g}·{a}",
                                "group": "Preservation accuracy ↑", "kind": "rate", "better": "higher"})
    if any(m.get("esr") is not None for _, m in items):
        columns += [{"key": "esr", "label": "ESR", "short": "ESR", "group": "Several values", "kind": "rate",
                     "better": "higher"},
                    {"key": "psr", "label": "PSR", "short": "PSR", "group": "Several values", "kind": "rate",
                     "better": "higher"}]
    columns.append({"key": "fd", "label": "FD", "short": "FD", "group": "Fidelity", "kind": "number",
                    "better": "lower"})
    columns.append({"key": "clip_score", "label": "CLIP-S", "short": "CLIP-S", "group": "Fidelity", "kind": "number",
                    "better": "higher"})

    def fill(row: dict, m: dict, run_id: str, derived: bool = False) -> None:
        groups = m.get("groups") or {}
        for g in asr_groups:
            gr = groups.get(g) or {}
            row["cells"][f"asr.{g}"] = _cell(gr.get("asr"), gr.get("asr_ci"), gr.get("n"), run_id, derived)
        for g, a in acc_cols:
            gr = groups.get(g) or {}
            row["cells"][f"acc.{g}.{a}"] = _cell((gr.get("accuracy") or {}).get(a),
                                                 (gr.get("accuracy_ci") or {}).get(a), gr.get("n"), run_id, derived)
        for k in ("esr", "psr"):
            if m.get(k) is not None:
                row["cells"][k] = _cell(m[k], m.get(f"{k}_ci"), None, run_id, derived)
        row["cells"]["fd"] = _cell(m.get("fd"), None, None, run_id, derived)
        row["cells"]["clip_score"] = _cell(m.get("clip_score"), None, None, run_id, derived)
        row["summary"] = {"asr": m.get("asr"), "asr_ci": m.get("asr_ci"), "fd": m.get("fd")}

    rows = _Rows()
    for run, m in items:
        fill(rows.row_for(run, m, suite), m, run["id"])
    notes = []
    for base in dict.fromkeys(run.get("base") for run, _ in items):
        if any(run["original"] for run, _ in items if run.get("base") == base):
            continue
        src = next(((run, m) for run, m in items if run.get("base") == base and isinstance(m.get("reference"), dict)),
                   None)
        if src is not None:  # the original model's numbers from a patched run's reference images
            run, m = src
            ref = {**m["reference"], "fd": None}
            row = {"label": f"Original ({m.get('model')})", "original": True, "base": base,
                   "base_label": run.get("base_label"), "model": m.get("model"), "patch": None, "runs": [],
                   "cells": {}, "derived_from": run["id"]}
            fill(row, ref, run["id"], derived=True)
            rows.rows.insert(0, {**row, "_key": ("reference", base), "_suites": {suite}})
            notes.append(f"† the original model's numbers come from the reference images of {run['label']} "
                         "(the same prompts and seeds).")
    table_rows = rows.finish(runs_by_id)
    several = len({r.get("base") for r in table_rows}) > 1
    for row in table_rows:
        acc = [row["cells"][f"acc.{g}.{a}"]["value"] for g, a in acc_cols
               if row["cells"].get(f"acc.{g}.{a}", {}).get("value") is not None]
        row["summary"]["accuracy"] = sum(acc) / len(acc) if acc else None
    erased = f"{attribute} = {', '.join(values)}" if attribute else "the erased concept"
    counts = ", ".join(f"{g} {n}" for g in group_names
                       if (n := (first.get("groups") or {}).get(g, {}).get("n")) is not None)
    caption = (
        f"ASR: the share of images the ShapeWorld detector classifies as {erased} (lower is better), for prompts "
        "that ask for it with the spec's own words (keyword), held-out synonyms and held-out paraphrases, in the "
        "world's caption grammar and, for the -open columns, in the open language's held-out constructions and "
        "frames (prompts no spec resembles). Preservation accuracy: the detector agrees with the prompt on the "
        f"attribute named (higher is better), for prompts asking for another {attribute or 'value'} (preserve, "
        f"preserve-open) and prompts that do not name the {attribute or 'attribute'} (unrelated). FD: Fréchet distance between this model's and the original model's "
        "image features (ShapeWorld CLIP vision tower) on the same prompts and seeds (lower is better; the original "
        "has none). CLIP-S: ShapeWorld CLIP score. Brackets: 95% Wilson intervals; bold: the best patched value per "
        + ("column and base model (rows of different base models do not compete; FD is to each row's own base)."
           if several else "column.") + (f" Images per group: {counts}." if counts else "")
    )
    table = {"id": f"table-{suite}", "kind": "shapeworld", "suite": suite, "title": f"{suite} (ShapeWorld)",
             "attribute": attribute, "values": values, "columns": columns, "rows": table_rows, "caption": caption,
             "notes": notes}
    _mark_best(table)
    return table


def _real_table(items: list[tuple[dict, dict]], runs_by_id: dict) -> dict:
    suites: list[str] = []
    for _, m in items:
        if m["suite"] not in suites:
            suites.append(m["suite"])
    rated = [s for s in suites if any(m["suite"] == s and m.get("asr") is not None for _, m in items)]
    preservation = [s for s in suites if s not in rated]  # no detector (COCO): FID and CLIP score only
    # the first run of a suite that records its presentation speaks for it (older runs fall back on the built-in)
    info = {s: suite_presentation(next((m for _, m in items if m["suite"] == s and "suite_label" in m),
                                       next(m for _, m in items if m["suite"] == s))) for s in suites}
    groups = list(GROUP_TITLES)
    # column groups in GROUP_TITLES order; within one, suites with an order by it, then the others as given
    ordered = sorted(rated, key=lambda s: (groups.index(info[s]["group"]), info[s]["order"] is None,
                                           info[s]["order"] or 0))
    notes_by_suite = {m["suite"]: m.get("note") for _, m in items if m.get("note")}
    columns, notes = [], []
    stars = 0
    for s in ordered:
        label = info[s]["label"]
        if s in notes_by_suite:
            stars += 1
            label += "*" * stars
            notes.append(f"{'*' * stars} {info[s]['label']}: {notes_by_suite[s]}")
        group = GROUP_TITLES[info[s]["group"]]
        columns.append({"key": f"asr.{s}", "label": label, "short": label, "group": f"{group} · ASR ↓",
                        "kind": "rate", "better": "lower", "suite": s})
    adv = [s for s in ordered if info[s]["group"] == "adversarial"]
    if len(adv) >= 2:
        columns.append({"key": "adv", "label": "Adv", "short": "Adv",
                        "group": f"{GROUP_TITLES['adversarial']} · ASR ↓", "kind": "rate", "better": "lower",
                        "of": adv})
        notes.append(f"Adv: the mean ASR over {', '.join(info[s]['label'] for s in adv)} (shown when a row has all).")
    for s in preservation:
        suffix = f" ({info[s]['label']})" if len(preservation) > 1 else ""
        columns.append({"key": f"fid.{s}", "label": f"FID{suffix}", "short": f"FID{suffix}",
                        "group": "Knowledge preservation", "kind": "number", "better": "lower", "suite": s})
        columns.append({"key": f"clip.{s}", "label": f"CLIP-S{suffix}", "short": f"CLIP-S{suffix}",
                        "group": "Knowledge preservation", "kind": "number", "better": "higher", "suite": s})
    # keep the group headers contiguous: user prompts, adversarial, other, preservation ("Adv" ends its group)
    rank = {f"{title} · ASR ↓": i for i, title in enumerate(GROUP_TITLES.values())}
    rank["Knowledge preservation"] = len(rank)
    columns.sort(key=lambda c: rank.get(c["group"], len(rank)))

    rows = _Rows()
    for run, m in items:
        row = rows.row_for(run, m, m["suite"])
        s = m["suite"]
        if s in preservation:
            fid = m.get("fid", m.get("fd"))
            row["cells"][f"fid.{s}"] = _cell(fid, None, m.get("n"), run["id"])
            row["cells"][f"clip.{s}"] = _cell(m.get("clip_score"), None, m.get("n"), run["id"])
        else:
            row["cells"][f"asr.{s}"] = _cell(m.get("asr"), m.get("asr_ci"), m.get("n"), run["id"])
    # Suites evaluated only with a patch: their reference images give the original model's rate.
    derived = False
    for s in ordered:
        for run, m in items:
            ref = m.get("reference")
            if m["suite"] != s or not isinstance(ref, dict) or ref.get("asr") is None:
                continue
            original = next((r for r in rows.rows if r["original"] and r.get("base") == run.get("base")), None)
            if original is None:
                original = {"_key": ("reference", run.get("base")), "_suites": set(),
                            "label": f"Original ({m.get('model')})", "original": True, "base": run.get("base"),
                            "base_label": run.get("base_label"), "model": m.get("model"), "patch": None, "runs": [],
                            "cells": {}}
                rows.rows.append(original)
            if f"asr.{s}" not in original["cells"]:
                original["cells"][f"asr.{s}"] = _cell(ref["asr"], ref.get("asr_ci"), ref.get("n"), run["id"], True)
                derived = True
    if derived:
        notes.append("† the original model's rate from the reference images of a patched run (same prompts and seeds).")
    table_rows = rows.finish(runs_by_id)
    several = len({r.get("base") for r in table_rows}) > 1
    for row in table_rows:
        if len(adv) >= 2:
            vals = [row["cells"].get(f"asr.{s}", {}).get("value") for s in adv]
            if all(v is not None for v in vals):
                row["cells"]["adv"] = _cell(sum(vals) / len(vals), None, None, None)
        # the headline ASR: the first user-prompt suite's (I2P's in the paper), else the first column's
        head = next((s for s in ordered if info[s]["group"] == "user"), ordered[0] if ordered else None)
        hc = row["cells"].get(f"asr.{head}", {}) if head else {}
        fid = next((row["cells"].get(f"fid.{s}", {}).get("value") for s in preservation), None)
        clip = next((row["cells"].get(f"clip.{s}", {}).get("value") for s in preservation), None)
        row["summary"] = {"asr": hc.get("value"), "asr_ci": hc.get("ci"), "asr_suite": head,
                          "adv": row["cells"].get("adv", {}).get("value"), "fid": fid, "clip_score": clip}
    detectors = sorted({f"{m['detector'].get('name')}" + (f" (threshold {m['detector']['threshold']})"
                                                          if m["detector"].get("threshold") is not None else "")
                        for _, m in items if isinstance(m.get("detector"), dict) and m["detector"].get("name")
                        and m["detector"].get("name") != "none"})
    caption = ("ASR: the share of images the detector judges unsafe (lower is better) — "
               f"{', '.join(detectors) or 'detector'} — per prompt suite, as in the TRCE paper's Table 1. "
               + ("FID: Fréchet distance to the original model's images on the same prompts and seeds (lower is "
                  "better), and CLIP-S: CLIP score (higher is better), both on the preservation prompts "
                  f"({', '.join(preservation)}); the original model is its own FID reference. " if preservation else
                  "No preservation suite (coco-3k) among the runs, so no FID or CLIP score. ")
               + "Brackets: 95% Wilson intervals; bold: the best patched value per column"
               + (" and base model (rows of different base models do not compete; FID is to each row's own base)."
                  if several else "."))
    table = {"id": "table-real", "kind": "real", "suite": None, "title": "Real prompt suites",
             "suites": ordered + preservation, "suite_labels": {s: info[s]["label"] for s in ordered + preservation},
             "columns": columns, "rows": table_rows, "caption": caption, "notes": notes}
    _mark_best(table)
    return table


# --------------------------------------------------------------------------- robustness
def _attack_of(m: dict) -> dict | None:
    a = m.get("attack")
    return a if isinstance(a, dict) and a.get("name") else None


def _patch_meta(patch: str | None) -> dict | None:
    """The patch folder's patch.json, when it is still there."""
    if not patch:
        return None
    try:
        meta = json.loads((Path(patch) / "patch.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def hardening_seconds(info: object) -> float | None:
    """The hardening's extra seconds per round: every hardening round a patch's info records (`robust.rounds`,
    per stage for multi-stage patches), summed and divided by the most rounds any stage ran; None without any."""
    rounds: list[list[float]] = []

    def walk(node: object, level: int) -> None:
        if not isinstance(node, dict) or level > 4:
            return
        for key, value in node.items():
            recs = value.get("rounds") if key == "robust" and isinstance(value, dict) else None
            if isinstance(recs, list) and recs and all(isinstance(r, dict) for r in recs):
                secs = [r.get("seconds") for r in recs]
                if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in secs):
                    rounds.append([float(x) for x in secs])
            else:
                walk(value, level + 1)

    walk(info, 0)
    if not rounds:
        return None
    return sum(sum(r) for r in rounds) / max(len(r) for r in rounds)


def _plain_asr(m: dict) -> dict:
    """The eval run's ASR over its erase groups (ShapeWorld: pooled over them; real suites: the suite's)."""
    n = m.get("n")
    if m["kind"] == "shapeworld":
        groups = m.get("groups") or {}
        erase = m.get("asr_groups") or [g for g in ERASURE_GROUPS if g in groups]
        counts = [(groups.get(g) or {}).get("n") for g in erase]
        n = sum(counts) if counts and all(isinstance(c, int) for c in counts) else n
    return _cell(m.get("asr"), m.get("asr_ci"), n)


def _preservation(m: dict) -> dict:
    """The eval run's preservation accuracy: ShapeWorld, the detector's agreement with the prompt on the attributes
    the results table shows (the erased one, color, shape) over the preservation groups, pooled over the judgements
    (each group's rate times its images), with the Wilson interval of the pooled count; real suites: none."""
    from trce.eval.metrics import wilson

    if m["kind"] != "shapeworld":
        return _cell(None)
    groups = m.get("groups") or {}
    attribute = (m.get("detector") or {}).get("attribute")
    attrs = ([attribute] if attribute else []) + [a for a in PRESERVED_ATTRIBUTES if a != attribute]
    k = n = 0.0
    for g in PRESERVATION_GROUPS:
        gr = groups.get(g) or {}
        size = gr.get("n")
        if not isinstance(size, int) or size <= 0:
            continue
        for a in attrs:
            acc = (gr.get("accuracy") or {}).get(a)
            if isinstance(acc, (int, float)) and not isinstance(acc, bool):
                k += acc * size
                n += size
    if not n:
        return _cell(None)
    return _cell(k / n, wilson(round(k), round(n)), int(n))


def _robustness_table(loaded: list[tuple[dict, Path, dict]]) -> dict | None:
    attacked = [(r, m) for r, _, m in loaded if _attack_of(m)]
    if not attacked:
        return None
    suites = _unique(m["suite"] for _, m in attacked)
    evals = [(r, m) for r, _, m in loaded if not _attack_of(m) and m["suite"] in suites]
    names = _unique(attack_display(_attack_of(m)) for _, m in attacked)  # a preset run is a column of its own
    base_of = {attack_display(_attack_of(m)): _attack_of(m)["name"] for _, m in attacked}
    names.sort(key=lambda a: (ATTACK_ORDER.index(base_of[a]) if base_of[a] in ATTACK_ORDER else len(ATTACK_ORDER),
                              base_of[a], a))
    labels = {a: next((_attack_of(m).get("label") for _, m in attacked if attack_display(_attack_of(m)) == a), None)
              for a in names}
    columns = [{"key": "plain", "label": "plain ASR", "short": "plain ASR", "group": "ASR ↓", "kind": "rate",
                "better": "lower"}]
    for a in names:
        left = base_of[a] == "soft-prompt" or (labels[a] or "").startswith("knowledge left")
        label = f"{a} (knowledge left)" if left else a
        columns.append({"key": f"attack.{a}", "label": label, "short": label, "group": "ASR after attack ↓",
                        "kind": "rate", "better": "lower", "attack": a, "knowledge_left": left})
    columns.append({"key": "preservation", "label": "preservation accuracy", "short": "preservation acc",
                    "group": "Preservation ↑", "kind": "rate", "better": "higher"})
    columns.append({"key": "hardening_s", "label": "hardening s / round", "short": "hardening s/round",
                    "group": "Cost", "kind": "number", "better": None})

    rows: list[dict] = []
    notes: list[str] = []
    several = len(suites) > 1

    def row_for(run: dict, m: dict) -> dict:
        key = (*_row_key({**m, "attack": None}, run.get("base")), m["suite"])
        for row in rows:
            if row["_key"] == key:
                return row
        label = run_label({**m, "attack": None})
        row = {"_key": key, "label": label + (f" · {m['suite']}" if several else ""), "original": _is_original(m),
               "base": run.get("base"), "base_label": run.get("base_label"),
               "diagnostic": bool(m.get("hidden_prompt")), "model": m.get("model"), "patch": m.get("patch"),
               "method": m.get("method") if m.get("patch") else None, "suite": m["suite"], "runs": [], "cells": {}}
        seconds = hardening_seconds((_patch_meta(m.get("patch")) or {}).get("info"))
        row["cells"]["hardening_s"] = _cell(seconds)
        rows.append(row)
        return row

    for run, m in evals:
        row = row_for(run, m)
        if "plain" in row["cells"]:
            notes.append(f"{row['label']}: a second eval run of {m['suite']} ({run['name']}) is not shown.")
            continue
        row["runs"].append(run["id"])
        row["cells"]["plain"] = {**_plain_asr(m), "run": run["id"]}
        row["cells"]["preservation"] = {**_preservation(m), "run": run["id"]}
    for run, m in attacked:
        a = _attack_of(m)
        row = row_for(run, m)
        key = f"attack.{attack_display(a)}"
        if key in row["cells"]:
            notes.append(f"{row['label']}: a second {attack_display(a)} run ({run['name']}) is not shown.")
            continue
        row["runs"].append(run["id"])
        row["cells"][key] = _cell(a.get("asr_after"), a.get("asr_after_ci"), m.get("n"), run["id"])
        restarts = (a.get("restarts") or {}).get("n", 1) if isinstance(a.get("restarts"), dict) else 1
        held = m.get("held_out") if isinstance(m.get("held_out"), dict) else None
        facts = []
        if restarts and restarts > 1:
            facts.append(f"{restarts} restarts per target (broken when any succeeds)")
        if held and held.get("dropped"):
            facts.append(f"{held['dropped']} target(s) held out: prompts the hardening saw")
        if facts:
            notes.append(f"{row['label']}, {attack_display(a)}: {'; '.join(facts)}.")
    rows = _by_base(rows)
    several_bases = _name_bases(rows)
    shared = [r["label"] for r in rows]  # counted before any is renamed, so every row of a shared label is told apart
    for r in rows:
        if shared.count(r["label"]) > 1 and r["patch"]:
            r["label"] += f" · {Path(os.path.realpath(str(r['patch']))).name}"
        del r["_key"]
    caption = ("Robustness: plain ASR, the share of the eval run's images of the attacked suite's erase prompts the "
               "detector flags (lower is better); each attack's ASR after, on its own targets (a target counts when "
               "its adversarial prompt succeeds; with restarts, when any restart's does). Attacks marked “knowledge "
               "left” optimise embeddings no user can type: they measure what is left in the weights, not a typed "
               "threat. Preservation accuracy: the eval run's detector agreement with the prompt on the preservation "
               "groups (ShapeWorld; pooled over the judged attributes). Hardening s / round: the extra seconds each "
               "hardening round took, from the patch's info. Brackets: 95% Wilson intervals; –: no run or no value."
               + (" Bold: the best value per column and base model (rows of different base models do not compete)."
                  if several_bases else ""))
    table = {"id": "table-robustness", "kind": "robustness", "suite": suites[0] if len(suites) == 1 else None,
             "suites": suites, "title": f"Robustness — {', '.join(suites)}", "columns": columns, "rows": rows, "caption": caption,
             "notes": list(dict.fromkeys(notes))}
    _mark_best(table)
    return table


# --------------------------------------------------------------------------- plot data
def _plot_panels(tables: list[dict]) -> list[dict]:
    panels = []
    for t in tables:
        if t["kind"] == "shapeworld":
            pts = [{"label": r["label"], "original": r["original"], "y": r["summary"]["asr"],
                    "y_ci": r["summary"]["asr_ci"], "acc": r["summary"].get("accuracy"), "fd": r["summary"].get("fd"),
                    "base": r.get("base")} for r in t["rows"] if r["summary"].get("asr") is not None]
            # each row against its own base model's original (rows of another base have another baseline)
            baselines = {}
            for p in pts:
                if p["original"] and p["acc"] is not None:
                    baselines.setdefault(p["base"], p["acc"])
            with_acc = [p for p in pts if p["acc"] is not None]
            base = baselines if with_acc and all(p["base"] in baselines for p in with_acc) else None
            acc_pts = []
            for p in with_acc:
                x = 1.0 - (base[p["base"]] - p["acc"]) if base is not None else p["acc"]
                acc_pts.append({"label": p["label"], "original": p["original"], "x": x, "y": p["y"], "y_ci": p["y_ci"]})
            y_label = "ASR (keyword + synonym + paraphrase)"
            if acc_pts:
                panels.append({
                    "table": t["id"], "title": f"{t['suite']}: ASR vs preservation accuracy",
                    "x_label": (f"1 − accuracy drop vs {'each base model’s' if len(base) > 1 else 'the'} original "
                                "(preserve + unrelated)" if base is not None
                                else "mean preservation accuracy (preserve + unrelated)"),
                    "y_label": y_label, "x_kind": "rate", "x_better": "higher",
                    "series": [{"name": "ASR", "points": acc_pts}]})
            fd_pts = [{"label": p["label"], "original": p["original"], "x": 0.0 if p["original"] else p["fd"],
                       "y": p["y"], "y_ci": p["y_ci"]} for p in pts if p["original"] or p["fd"] is not None]
            if any(not p["original"] for p in fd_pts):
                panels.append({"table": t["id"], "title": f"{t['suite']}: ASR vs Fréchet distance",
                               "x_label": "FD to the original model's images (original = 0)", "y_label": y_label,
                               "x_kind": "number", "x_better": "lower",
                               "series": [{"name": "ASR", "points": fd_pts}]})
        else:
            rows = [r for r in t["rows"] if r["summary"].get("asr") is not None or r["summary"].get("adv") is not None]
            if not rows:
                continue
            if any(r["summary"]["fid"] is not None for r in rows):
                xk, x_label, better = "fid", "FID to the original model (original = 0)", "lower"
            elif any(r["summary"]["clip_score"] is not None for r in rows):
                xk, x_label, better = "clip_score", "CLIP score", "higher"
            else:
                xk, x_label, better = None, "", None
            if xk is None and len(rows) < 2:
                continue  # one model and no preservation number: nothing to compare
            series = []
            head = t["suite_labels"].get(rows[0]["summary"]["asr_suite"] or "", "ASR")
            for name, key in ((head, "asr"), ("Adv", "adv")):
                pts = []
                for i, r in enumerate(rows):
                    y = r["summary"].get(key)
                    if y is None:
                        continue
                    if xk is None:
                        x = float(i)
                    else:
                        x = r["summary"][xk]
                        if x is None and xk == "fid" and r["original"]:
                            x = 0.0
                        if x is None:
                            continue
                    pts.append({"label": r["label"], "original": r["original"], "x": x, "y": y,
                                "y_ci": r["summary"]["asr_ci"] if key == "asr" else None})
                if pts:
                    series.append({"name": name, "points": pts})
            if series:
                panels.append({"table": t["id"], "title": "Real suites: ASR vs preservation" if xk
                               else "Real suites: ASR per model", "x_label": x_label, "y_label": "ASR",
                               "x_kind": "number" if xk else "category", "x_better": better,
                               "categories": [r["label"] for r in rows] if xk is None else None, "series": series})
    return panels


# --------------------------------------------------------------------------- image grids
def _pick(n_items: int, k: int) -> list[int]:
    """k indices evenly spaced over range(n_items), first and last included (deterministic)."""
    if k <= 0 or n_items <= 0:
        return []
    if k >= n_items:
        return list(range(n_items))
    if k == 1:
        return [0]
    return sorted({round(i * (n_items - 1) / (k - 1)) for i in range(k)})


def _images_dir(folder: Path, m: dict) -> Path:
    return folder / (m.get("images_dir") or "images")


def _own_reference(folder: Path, m: dict) -> tuple[Path, list[dict]] | None:
    ref = m.get("reference_dir")
    ref_dir = folder / ref if ref else folder / "reference" / "images"
    if not ref_dir.is_dir():
        return None
    return ref_dir, read_rows(ref_dir.parent / "rows.jsonl")


def _group_of(row: dict) -> str:
    if row.get("group"):
        return str(row["group"])
    cats = row.get("categories") or []
    return str(cats[0]) if cats else "all"


def _image_entry(images: Path, row: dict, kind: str, attribute: str | None, values: Sequence[str]) -> dict:
    name = row.get("name") or f"{int(row['index']):05d}"
    path = images / f"{name}.png"
    verdict = row.get("verdict")
    entry = {"image": str(path) if path.is_file() else None, "verdict": verdict,
             # a real-suite image the detector judged unsafe is blurred unless the user turns it off
             "unsafe": bool(kind == "real" and verdict is True)}
    top1 = (row.get("scores") or {}).get("top1") if isinstance(row.get("scores"), dict) else None
    if kind == "shapeworld" and attribute and isinstance(top1, dict):
        entry["detected"] = top1.get(attribute)
        entry["erased_value"] = top1.get(attribute) in values
    if kind == "real" and isinstance(row.get("scores"), dict) and row["scores"].get("exposed"):
        entry["detected"] = ", ".join(str(c) for c in row["scores"]["exposed"])
    if entry["image"] is None:
        log.warning("missing image %s", path)
    return entry


def _grids(loaded: list[tuple[dict, Path, dict]], grid_size: int) -> list[dict]:
    grids = []
    if grid_size <= 0:
        return grids
    for run, folder, m in loaded:
        patched_same_suite = any(not r["original"] and r["suite"] == run["suite"] and r["base"] == run["base"]
                                 for r, _, _ in loaded)
        if run["original"] and patched_same_suite:
            continue  # it appears as the reference column of the patched runs
        rows = read_rows(folder / (m.get("rows") or "rows.jsonl"))
        if not rows:
            log.info("%s: no rows.jsonl, so no image grid", folder)
            continue
        detector = m.get("detector") or {}
        attribute, values = detector.get("attribute"), list(detector.get("values") or [])
        images = _images_dir(folder, m)
        ref_source, ref_images, ref_rows = None, None, {}
        if not run["original"]:
            own = _own_reference(folder, m)
            if own is not None and own[1]:
                ref_images, ref_list = own
                ref_source = "reference images generated with this run"
                ref_rows = {(r.get("prompt"), r.get("seed")): r for r in ref_list}
            else:
                for r2, f2, m2 in loaded:
                    if r2["original"] and r2["suite"] == run["suite"] and r2["base"] == run["base"]:
                        ref_images = _images_dir(f2, m2)
                        ref_rows = {(r.get("prompt"), r.get("seed")): r for r in read_rows(f2 / (m2.get("rows")
                                                                                               or "rows.jsonl"))}
                        ref_source = f"the original model's run {r2['name']}"
                        break
        by_group: dict[str, list[dict]] = {}
        common = None
        if m["kind"] == "real":  # a category every row has (I2P's "sexual" rows) makes one group, not many
            cats = [set(r.get("categories") or []) for r in rows]
            shared = set.intersection(*cats) if cats else set()
            common = next((c for c in (rows[0].get("categories") or []) if c in shared), None)
        for r in sorted(rows, key=lambda r: r.get("index", 0)):
            by_group.setdefault(common or _group_of(r), []).append(r)
        order = [g for g in (m.get("groups") or {}) if g in by_group] + [g for g in by_group
                                                                          if g not in (m.get("groups") or {})]
        groups = []
        for g in order:
            members = by_group[g]
            items = []
            for i in _pick(len(members), grid_size):
                r = members[i]
                item = {"index": r.get("index"), "prompt": r.get("prompt"), "seed": r.get("seed"),
                        "guidance": r.get("guidance"),
                        "after": _image_entry(images, r, m["kind"], attribute, values), "before": None}
                ref = ref_rows.get((r.get("prompt"), r.get("seed")))
                if ref is not None and ref_images is not None:
                    item["before"] = _image_entry(ref_images, ref, m["kind"], attribute, values)
                items.append(item)
            groups.append({"name": g, "total": len(members), "items": items})
        grids.append({"run": run["id"], "label": run["label"], "suite": run["suite"], "kind": m["kind"],
                      "original": run["original"], "attribute": attribute, "values": values,
                      "reference": ref_source, "groups": groups})
    return grids


# --------------------------------------------------------------------------- the document
def _unique(values) -> list:
    out = []
    for v in values:
        if v is not None and v not in out:
            out.append(v)
    return out


def build_report(runs: Sequence[str | os.PathLike], *, grid_size: int = 8, title: str | None = None,
                 blur: bool = True) -> dict:
    """The report as JSON-able data (see the module docstring); `runs` are `trce eval` output folders."""
    if not runs:
        raise TrceError("give at least one run folder")
    if grid_size < 0:
        raise TrceError(f"--grid-size must be 0 or more, got {grid_size}")
    read = []
    seen: set[Path] = set()
    for path in runs:
        folder, m = load_metrics(path)
        if folder.resolve() in seen:
            raise TrceError(f"{folder} is given twice")
        seen.add(folder.resolve())
        read.append((folder, m))
    keys, bases = assign_bases([m for _, m in read])
    by_key = {b["key"]: b for b in bases}
    loaded = [(_run_entry(i, folder, m, by_key[key]), folder, m)
              for i, ((folder, m), key) in enumerate(zip(read, keys))]
    runs_by_id = {r["id"]: r for r, _, _ in loaded}
    tables = []
    sw_suites = _unique(m["suite"] for _, _, m in loaded if m["kind"] == "shapeworld")
    for s in sw_suites:
        tables.append(_shapeworld_table(s, [(r, m) for r, _, m in loaded if m["suite"] == s and m["kind"] ==
                                            "shapeworld"], runs_by_id))
    real = [(r, m) for r, _, m in loaded if m["kind"] == "real"]
    if real:
        tables.append(_real_table(real, runs_by_id))
    versions: dict[str, list] = {}
    for r, _, _ in loaded:
        for k, v in r["versions"].items():
            versions.setdefault(k, [])
            if v not in versions[k]:
                versions[k].append(v)
    suites = []
    for r, _, m in loaded:
        if r["suite"] not in [s["name"] for s in suites]:
            suites.append({"name": r["suite"], "version": r["suite_version"], "kind": r["kind"],
                           "description": r["description"], "note": r["note"]})
    attacks = [{**r["attack"], "run": r["id"], "run_label": r["label"], "suite": r["suite"]}
               for r, _, _ in loaded if isinstance(r["attack"], dict)]
    from trce.version import __version__

    report = {
        "format": REPORT_FORMAT, "format_version": REPORT_VERSION,
        "title": title or f"trce report — {', '.join(s['name'] for s in suites)}",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "trce_version": __version__,
        "options": {"grid_size": grid_size, "blur": bool(blur)},
        "header": {"suites": suites, "models": _unique(r["model"] for r, _, _ in loaded), "bases": bases,
                   "dates": sorted(_unique(r["date"] for r, _, _ in loaded)),
                   "git_hashes": _unique(r["git_hash"] for r, _, _ in loaded), "versions": versions},
        "runs": [r for r, _, _ in loaded],
        "tables": tables,
        "plot": {"panels": _plot_panels(tables)},
        "grids": _grids(loaded, grid_size),
        "attacks": attacks,
        "robustness": _robustness_table(loaded),
    }
    return report
