"""Restarts judged (`--budget restarts=N`): every restart's adversarial prompt drawn and judged by the run's detector
in out/restarts, and per target the restart `trce.attacks.restarts.choose_restart` keeps, its image copied to
out/images."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

RESTARTS = "restarts"


def judge_restarts(pipe, mod, results, targets, guidances, rows, out: Path, settings, detector, state,
                   progress: bool):
    """Every restart's prompt drawn and judged in out/restarts; per target the restart `choose_restart` keeps.

    Returns (the kept results, the after-records of out/rows.jsonl), whose images are copied to out/images.
    """
    import json
    import shutil

    from trce.attacks.restarts import choose_restart, restart_results
    from trce.attacks.soft_prompt import placeholder
    from trce.eval.prompts import PromptRow
    from trce.eval.rows import IMAGES, ROWS, generate_rows
    from trce.utils import io

    parts = [restart_results(r, out) for r in results]
    flat, seeds, gs, names = [], [], [], []
    for t, g, row, ps in zip(targets, guidances, rows, parts):
        for k, part in enumerate(ps):
            flat.append(PromptRow(prompt=part.prompt if mod.TYPED else f"{placeholder(t.index)} r{k}", seed=t.seed,
                                  guidance=g, categories=row.categories, case_number=t.index,
                                  extra={**row.extra, "target_prompt": t.prompt, "restart": k}))
            seeds.append(t.seed)
            gs.append(g)
            names.append(f"{t.index:05d}-r{k}")
    embeds = None if mod.TYPED else torch.stack([part.embeds["prompt_embeds"] for ps in parts for part in ps])
    judged = generate_rows(pipe, flat, seeds, gs, out / RESTARTS, settings, detector, state, names=names,
                           progress=progress, desc=f"restarts {mod.NAME}", embeds=embeds)
    kept, after, start = [], [], 0
    for i, (t, res, ps) in enumerate(zip(targets, results, parts)):
        recs = judged[start : start + len(ps)]
        start += len(ps)
        verdicts = [rec["verdict"] for rec in recs]
        c = choose_restart([part.objective for part in ps], verdicts)
        records = [{**rec, "verdict": v} for rec, v in zip(res.extra["restarts"], verdicts)]
        kept.append(dataclasses.replace(ps[c], seconds=res.seconds, digest=res.digest, alternatives=ps,
                                        extra={**ps[c].extra, "restart": c, "restarts": records,
                                               "broken_by": [k for k, v in enumerate(verdicts) if v is True]}))
        rec = recs[c]
        after.append({**rec, "index": i, "name": f"{i:05d}",
                      "prompt": rec["prompt"] if mod.TYPED else placeholder(t.index),
                      "extra": {**rec["extra"], "restart": c}, "restart_image": f"{RESTARTS}/{IMAGES}/{rec['name']}.png"})
    if state.is_main_process:
        (out / IMAGES).mkdir(parents=True, exist_ok=True)
        for rec in after:
            with io.atomic_path(out / IMAGES / f"{rec['name']}.png") as tmp:
                shutil.copyfile(out / rec["restart_image"], tmp)
        io.write_text(out / ROWS, "".join(json.dumps(rec) + "\n" for rec in after))
    state.wait_for_everyone()
    return kept, after
