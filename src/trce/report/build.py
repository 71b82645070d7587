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
import os
from collections.abc import Sequence
from pathlib import Path

from trce.errors import TrceError
from trce.report.grids import image_grids
from trce.report.panels import plot_panels
from trce.report.robustness import robustness_table
from trce.report.runs import assign_bases, load_metrics, run_entry, unique
from trce.report.suite_tables import real_table, shapeworld_table

REPORT_FORMAT = "trce-report"
REPORT_VERSION = 1


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
    loaded = [(run_entry(i, folder, m, by_key[key]), folder, m)
              for i, ((folder, m), key) in enumerate(zip(read, keys))]
    runs_by_id = {r["id"]: r for r, _, _ in loaded}
    tables = []
    sw_suites = unique(m["suite"] for _, _, m in loaded if m["kind"] == "shapeworld")
    for s in sw_suites:
        tables.append(shapeworld_table(s, [(r, m) for r, _, m in loaded if m["suite"] == s and m["kind"] ==
                                            "shapeworld"], runs_by_id))
    real = [(r, m) for r, _, m in loaded if m["kind"] == "real"]
    if real:
        tables.append(real_table(real, runs_by_id))
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
        "header": {"suites": suites, "models": unique(r["model"] for r, _, _ in loaded), "bases": bases,
                   "dates": sorted(unique(r["date"] for r, _, _ in loaded)),
                   "git_hashes": unique(r["git_hash"] for r, _, _ in loaded), "versions": versions},
        "runs": [r for r, _, _ in loaded],
        "tables": tables,
        "plot": {"panels": plot_panels(tables)},
        "grids": image_grids(loaded, grid_size),
        "attacks": attacks,
        "robustness": robustness_table(loaded),
    }
    return report
