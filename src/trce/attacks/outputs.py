"""An attack run's outputs: the folder's file names, adversarial.csv (`write_csv`), metrics.json (`run_metrics`: both
rates, per group or category, and the attack's record) and the printed summary (`AttackResult`, `format_summary`)."""

from __future__ import annotations

import csv
import dataclasses
import time
from pathlib import Path

from trce.attacks.options import AttackOptions
from trce.eval.summary import Metrics

RESULTS = "results.jsonl"
BEFORE = "before"
CSV_NAME = "adversarial.csv"


class AttackResult(Metrics):
    """An attack run's metrics (`metrics.json`: the ASR after, with `before`/`after`/`attack` records), the
    per-target results (`.results`, `trce.attacks.targets.TargetResult`) and the printed summary (`.summary()`)."""

    results: list | None = None

    def summary(self) -> str:
        return format_summary(self)

    def table(self) -> str:
        return self.summary()


def write_csv(path: Path, results, targets, guidances, typed: bool, restarts: bool = False) -> None:
    from trce.attacks.soft_prompt import placeholder
    from trce.utils import io

    columns = ["case_number", "prompt", "evaluation_seed", "evaluation_guidance", "target_prompt"]
    if not typed:
        columns.append("embeddings")
    if restarts:
        columns.append("restart")
    with io.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for r, t, g in zip(results, targets, guidances):
            row = [t.index, r.prompt if typed else placeholder(t.index), t.seed, g, t.prompt]
            if not typed:
                row.append(r.embeddings or "")
            if restarts:
                row.append(r.extra.get("restart", 0))
            w.writerow(row)


def _rate(records) -> dict:
    from trce.eval import metrics as M

    flags = [r["verdict"] for r in records if r["verdict"] is not None]
    if not flags:
        return {"n": len(records), "asr": None, "asr_ci": None}
    return M.rate(flags)


def _rates(records, kind: str) -> dict:
    """The pooled rate plus, as `trce eval` writes them, per group (ShapeWorld) or per category (real suites)."""
    out = _rate(records)
    if kind == "shapeworld":
        names = list(dict.fromkeys(r["group"] for r in records))
        out["groups"] = {g: {**_rate([r for r in records if r["group"] == g]), "accuracy": {}, "accuracy_ci": {},
                             "clip_score": None, "fd": None} for g in names}
    else:
        cats = sorted({c for r in records for c in r["categories"]})
        out["by_category"] = {c: _rate([r for r in records if c in r["categories"]]) for c in cats}
    return out


def format_summary(m: dict) -> str:
    from trce.attacks.budget import record_label
    from trce.eval.summary import format_ci, format_rate

    a = m["attack"]
    lines = [
        (f"{record_label(a)} on {m['model']}{' + ' + m['patch'] if m['patch'] else ''}, suite {m['suite']}: "
         f"{m['n']} targets, {a['seconds_per_target']:.2f} s per target"),
        f"label: {a['label']}",
        (f"ASR before {format_rate(a['asr_before'])} {format_ci(a['asr_before_ci'])}   after {format_rate(a['asr_after'])} "
         f"{format_ci(a['asr_after_ci'])}   either {format_rate(a.get('asr_either'))}   (detector {m['detector']['name']})"),
        f"objective (lower is better): start {a['objective']['start_mean']:.4g} -> {a['objective']['end_mean']:.4g}",
    ]
    r = a.get("restarts") or {}
    if r.get("n", 1) > 1:
        per = "  ".join(f"#{k} {format_rate(x)}" for k, x in enumerate(r.get("asr_by_restart") or []))
        lines.append(f"restarts: {r['n']} per target, broken by any {r.get('broken_any')} of {m['n']}   "
                     f"each: {per}")
    h = m.get("held_out")
    if h:
        lines.append(f"held out: {h['dropped']} targets the hardened patch saw ({', '.join(h['hardened_by'])})")
    if m.get("replay"):
        lines.append(f"replay on another model: {m['replay']}")
    return "\n".join(lines)


def _restart_record(budget, results) -> dict:
    """metrics.json attack.restarts: how many, how chosen, and per restart its own success rate."""
    from trce.attacks.budget import restarts_of
    from trce.attacks.restarts import RESTART_SELECTION
    from trce.eval import metrics as M

    n = restarts_of(budget)
    if n == 1:
        return {"n": 1}
    verdicts = [[rec.get("verdict") for rec in r.extra["restarts"]] for r in results]
    per = [[v[k] for v in verdicts if v[k] is not None] for k in range(n)]
    rates = [M.rate(x) if x else {"asr": None, "asr_ci": None} for x in per]
    return {"n": n, "selection": RESTART_SELECTION, "broken_any": sum(bool(r.extra.get("broken_by")) for r in results),
            "asr_by_restart": [x["asr"] for x in rates], "asr_by_restart_ci": [x["asr_ci"] for x in rates],
            "chosen": [r.extra.get("restart", 0) for r in results],
            "objective_by_restart": [sum(rec["objective"] for rec in (r.extra["restarts"][k] for r in results))
                                     / len(results) for k in range(n)]}


def run_metrics(model, edit, mod, budget, suite, targets, results, before, after, detector, settings, size,
                image_size, denoiser, device, state, concept_record, opts: AttackOptions, out, t0,
                record: dict,                held_out: dict | None = None) -> dict:
    from trce.eval.measures import mean_of
    from trce.utils import io

    b, a = _rates(before, suite.kind), _rates(after, suite.kind)
    by_index = {r["index"]: r["verdict"] for r in before}
    e = _rate([{"verdict": None if r["verdict"] is None or by_index.get(r["index"]) is None
                else bool(r["verdict"] or by_index[r["index"]])} for r in after])
    from trce.attacks.budget import budget_label

    typed = mod.TYPED
    attack = {
        "name": mod.NAME, "display": budget_label(mod.NAME, budget), "preset": getattr(budget, "preset", ""),
        "label": mod.LABEL, "typed": typed, "budget": dataclasses.asdict(budget), "seed": opts.seed,
        "asr_before": b["asr"], "asr_before_ci": b["asr_ci"], "asr_after": a["asr"], "asr_after_ci": a["asr_ci"],
        # An attacker can always fall back on the plain prompt: a target counts when either prompt succeeds.
        "asr_either": e["asr"], "asr_either_ci": e["asr_ci"],
        "seconds_per_target": mean_of([r.seconds for r in results]),
        # per target, the optimisation steps actually run (early stopping: up to the block that succeeded)
        "steps": [r.steps for r in results],
        **({"success_block": [r.extra.get("success_block") for r in results]}
           if any("success_block" in r.extra for r in results) else {}),
        "objective": {"start_mean": mean_of([r.objective_start for r in results]),
                      "end_mean": mean_of([r.objective for r in results]),
                      "plain_mean": mean_of([r.objective_plain for r in results]),
                      "improved": sum(r.objective < r.objective_start for r in results)},
        "groups": opts.group_list() if suite.kind == "shapeworld" else None,
        "restarts": _restart_record(budget, results),
        "seed_stream": held_out["seed_stream"] if held_out is not None else 0,
        **concept_record,
    }
    replay = None
    if typed:
        extra = (f" --detector shapeworld --concept {suite.attribute}={','.join(suite.values)}"
                 if suite.kind == "shapeworld" else f" --detector {detector.name}")
        replay = f"trce eval --model MODEL --prompts {out / CSV_NAME}{extra} --out DIR"
    # The top level reads as a `trce eval` metrics file of the adversarial prompts (what `trce report`
    # tabulates, in a row of its own per attack); "attack" holds both rates and the attack's record.
    from trce.eval.rows import IMAGES, ROWS

    return {
        "suite": suite.name, "suite_version": suite.version, "kind": suite.kind, **suite.presentation(),
        "description": f"{suite.description} Attacked by {mod.NAME}: {mod.LABEL}.", "note": suite.note,
        "model": model, "patch": None if edit is None else (edit.source or f"(unsaved {edit.method} edit)"),
        "method": edit.method if edit is not None else None, "n": len(targets),
        "asr": a["asr"], "asr_ci": a["asr_ci"],
        **({"asr_groups": list(a["groups"]), "groups": a["groups"]} if suite.kind == "shapeworld"
           else {"by_category": a["by_category"]}),
        "fd": None, "clip_score": None,
        "attack": attack, "before": b, "after": a, "held_out": held_out,
        "detector": detector.info(),
        "settings": {"steps": settings.steps, "guidance": settings.guidance, "size": size or image_size,
                     "seeds": [0], "limit": opts.limit, "batch_size": settings.batch_size,
                     "per_prompt_guidance": opts.guidance is None and any(t.guidance is not None for t in targets),
                     "dtype": str(denoiser.dtype).replace("torch.", ""), "device": str(device)},
        "images_dir": IMAGES, "rows": ROWS, "reference_dir": None,
        "files": {"adversarial": CSV_NAME, "results": RESULTS, "before_images_dir": f"{BEFORE}/{IMAGES}",
                  "before_rows": f"{BEFORE}/{ROWS}", "embeddings": None if typed else "embeddings"},
        "replay": replay, "processes": state.num_processes, "seconds": round(time.time() - t0, 1),
        **io.run_record(config=record, seeds={"attack": opts.seed, "images": "the prompts' own seeds"}),
    }
