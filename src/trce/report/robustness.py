"""The report's robustness table (`robustness_table`): with attack runs, rows = model/patch (and suite), columns = the
plain ASR of its eval run, the ASR after each attack, the preservation accuracy and the hardening's seconds per round."""

from __future__ import annotations

import os
from pathlib import Path

from trce.report.runs import attack_display, is_original, patch_meta, row_key, run_label, unique
from trce.report.suite_tables import (
    ERASURE_GROUPS,
    PRESERVATION_GROUPS,
    PRESERVED_ATTRIBUTES,
    by_base,
    make_cell,
    mark_best,
    name_bases,
)

# the attacks in the order the robustness table shows them (others follow, by name)
ATTACK_ORDER = ("ring-a-bell", "mma-text", "unlearndiff", "soft-prompt")


def _attack_of(m: dict) -> dict | None:
    a = m.get("attack")
    return a if isinstance(a, dict) and a.get("name") else None


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
    return make_cell(m.get("asr"), m.get("asr_ci"), n)


def _preservation(m: dict) -> dict:
    """The eval run's preservation accuracy: ShapeWorld, the detector's agreement with the prompt on the attributes
    the results table shows (the erased one, color, shape) over the preservation groups, pooled over the judgements
    (each group's rate times its images), with the Wilson interval of the pooled count; real suites: none."""
    from trce.eval.metrics import wilson

    if m["kind"] != "shapeworld":
        return make_cell(None)
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
        return make_cell(None)
    return make_cell(k / n, wilson(round(k), round(n)), int(n))


def robustness_table(loaded: list[tuple[dict, Path, dict]]) -> dict | None:
    attacked = [(r, m) for r, _, m in loaded if _attack_of(m)]
    if not attacked:
        return None
    suites = unique(m["suite"] for _, m in attacked)
    evals = [(r, m) for r, _, m in loaded if not _attack_of(m) and m["suite"] in suites]
    names = unique(attack_display(_attack_of(m)) for _, m in attacked)  # a preset run is a column of its own
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
        key = (*row_key({**m, "attack": None}, run.get("base")), m["suite"])
        for row in rows:
            if row["_key"] == key:
                return row
        label = run_label({**m, "attack": None})
        row = {"_key": key, "label": label + (f" · {m['suite']}" if several else ""), "original": is_original(m),
               "base": run.get("base"), "base_label": run.get("base_label"),
               "diagnostic": bool(m.get("hidden_prompt")), "model": m.get("model"), "patch": m.get("patch"),
               "method": m.get("method") if m.get("patch") else None, "suite": m["suite"], "runs": [], "cells": {}}
        seconds = hardening_seconds((patch_meta(m.get("patch")) or {}).get("info"))
        row["cells"]["hardening_s"] = make_cell(seconds)
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
        row["cells"][key] = make_cell(a.get("asr_after"), a.get("asr_after_ci"), m.get("n"), run["id"])
        restarts = (a.get("restarts") or {}).get("n", 1) if isinstance(a.get("restarts"), dict) else 1
        held = m.get("held_out") if isinstance(m.get("held_out"), dict) else None
        facts = []
        if restarts and restarts > 1:
            facts.append(f"{restarts} restarts per target (broken when any succeeds)")
        if held and held.get("dropped"):
            facts.append(f"{held['dropped']} target(s) held out: prompts the hardening saw")
        if facts:
            notes.append(f"{row['label']}, {attack_display(a)}: {'; '.join(facts)}.")
    rows = by_base(rows)
    several_bases = name_bases(rows)
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
    mark_best(table)
    return table
