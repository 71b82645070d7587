"""The report's results tables, shaped like the TRCE paper's Table 1: one per ShapeWorld suite (`shapeworld_table`)
and one for all real suites (`real_table`); rows are models/patches grouped by base model (`TableRows`), cells keep
the run they came from, and the best patched value per column and base is bolded (`mark_best`)."""

from __future__ import annotations

import os
from pathlib import Path

from trce.report.runs import GROUP_TITLES, row_key, suite_presentation

# The ShapeWorld suites' groups (trce.eval.suites): the -open ones are the open language's held-out templates.
ERASURE_GROUPS = ("keyword", "synonym", "paraphrase", "keyword-open", "synonym-open", "paraphrase-open")
PRESERVATION_GROUPS = ("preserve", "unrelated", "preserve-open")
PRESERVED_ATTRIBUTES = ("color", "shape")  # shown besides the erased attribute (the paper-style table stays narrow)


def make_cell(value, ci=None, n=None, run: str | None = None, derived: bool = False) -> dict:
    """A table cell: its value, 95% interval, count and the run it came from (derived: from reference images)."""
    cell = {"value": None if value is None else float(value), "ci": list(ci) if ci else None, "n": n, "run": run}
    if derived:
        cell["derived"] = True
    return cell


class TableRows:
    """Table rows keyed by (model, patch, method, attack); a second run of a suite already in a row opens a new row."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def row_for(self, run: dict, metrics: dict, suite: str) -> dict:
        key = row_key(metrics, run.get("base"))
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
        rows = by_base(self.rows)
        name_bases(rows)  # before telling two rows of one label apart: two bases are told apart by name
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


def by_base(rows: list[dict]) -> list[dict]:
    """Rows grouped by base model (bases in order of first appearance), each base's original rows first."""
    bases = list(dict.fromkeys(r.get("base") for r in rows))
    return [r for b in bases for original in (True, False) for r in rows
            if r.get("base") == b and bool(r["original"]) == original]


def name_bases(rows: list[dict]) -> bool:
    """With rows of several base models, each row's label names its base (unless it already ends with it: "Original
    (model)"); returns whether there were several."""
    if len({r.get("base") for r in rows}) < 2:
        return False
    for r in rows:
        label = r.get("base_label")
        if label and f"({label})" not in r["label"]:
            r["label"] += f" · {label}"
    return True


def mark_best(table: dict) -> None:
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


def shapeworld_table(suite: str, items: list[tuple[dict, dict]], runs_by_id: dict) -> dict:
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
            row["cells"][f"asr.{g}"] = make_cell(gr.get("asr"), gr.get("asr_ci"), gr.get("n"), run_id, derived)
        for g, a in acc_cols:
            gr = groups.get(g) or {}
            row["cells"][f"acc.{g}.{a}"] = make_cell((gr.get("accuracy") or {}).get(a),
                                                 (gr.get("accuracy_ci") or {}).get(a), gr.get("n"), run_id, derived)
        for k in ("esr", "psr"):
            if m.get(k) is not None:
                row["cells"][k] = make_cell(m[k], m.get(f"{k}_ci"), None, run_id, derived)
        row["cells"]["fd"] = make_cell(m.get("fd"), None, None, run_id, derived)
        row["cells"]["clip_score"] = make_cell(m.get("clip_score"), None, None, run_id, derived)
        row["summary"] = {"asr": m.get("asr"), "asr_ci": m.get("asr_ci"), "fd": m.get("fd")}

    rows = TableRows()
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
    mark_best(table)
    return table


def real_table(items: list[tuple[dict, dict]], runs_by_id: dict) -> dict:
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

    rows = TableRows()
    for run, m in items:
        row = rows.row_for(run, m, m["suite"])
        s = m["suite"]
        if s in preservation:
            fid = m.get("fid", m.get("fd"))
            row["cells"][f"fid.{s}"] = make_cell(fid, None, m.get("n"), run["id"])
            row["cells"][f"clip.{s}"] = make_cell(m.get("clip_score"), None, m.get("n"), run["id"])
        else:
            row["cells"][f"asr.{s}"] = make_cell(m.get("asr"), m.get("asr_ci"), m.get("n"), run["id"])
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
                original["cells"][f"asr.{s}"] = make_cell(ref["asr"], ref.get("asr_ci"), ref.get("n"), run["id"], True)
                derived = True
    if derived:
        notes.append("† the original model's rate from the reference images of a patched run (same prompts and seeds).")
    table_rows = rows.finish(runs_by_id)
    several = len({r.get("base") for r in table_rows}) > 1
    for row in table_rows:
        if len(adv) >= 2:
            vals = [row["cells"].get(f"asr.{s}", {}).get("value") for s in adv]
            if all(v is not None for v in vals):
                row["cells"]["adv"] = make_cell(sum(vals) / len(vals), None, None, None)
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
    mark_best(table)
    return table
