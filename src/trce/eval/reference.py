"""The original model's rows on a run's prompts and seeds (`draw_reference`): generated into the run folder, or drawn
once into a shared cache (`reference_cache`) and linked from there."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from trce.eval.options import EvalOptions
from trce.eval.rows import IMAGES, ROWS, generate_rows
from trce.eval.suites import Suite
from trce.utils import io


def draw_reference(pipe, rows, seeds, guidances, ref_dir: Path, settings, detector, state, config: EvalOptions,
                   suite: Suite, key: dict) -> list[dict]:
    """The original model's rows in ref_dir (images/ and rows.jsonl), generated there or linked from the shared
    cache (`reference_cache`, generated there once)."""
    if config.reference_cache is None:
        return generate_rows(pipe, rows, seeds, guidances, ref_dir, settings, detector, state,
                             progress=config.progress, desc=f"reference {suite.name}")
    ckey = {k: key[k] for k in ("base", "steps", "size", "suite", "detector", "dtype")}
    digest = hashlib.sha256(json.dumps(ckey, sort_keys=True, default=str).encode()).hexdigest()[:16]
    cache = Path(config.reference_cache).expanduser() / f"{suite.name}-{digest}"
    names = [hashlib.sha1(f"{r.prompt}\0{s}\0{g}".encode()).hexdigest()[:20] for r, s, g in zip(rows, seeds, guidances)]
    # runs sharing the cache draw into it one at a time (a later one finds the images drawn)
    with io.run_lock(cache, "reference_cache", wait=True) if state.is_main_process else contextlib.nullcontext():
        cached = generate_rows(pipe, rows, seeds, guidances, cache, settings, detector, state, names=names,
                               progress=config.progress, desc=f"reference {suite.name}")
    if state.is_main_process:
        (ref_dir / IMAGES).mkdir(parents=True, exist_ok=True)
        recs = []
        for i, rec in enumerate(cached):
            dst = ref_dir / IMAGES / f"{i:05d}.png"
            src = cache / IMAGES / f"{rec['name']}.png"
            if dst.exists():
                dst.unlink()
            try:
                os.link(src, dst)
            except OSError:
                import shutil

                shutil.copyfile(src, dst)
            recs.append({**rec, "index": i, "name": f"{i:05d}"})
        io.write_text(ref_dir / ROWS, "".join(json.dumps(r) + "\n" for r in recs))
        io.write_json(ref_dir / "cache.json", {"cache": str(cache), "key": ckey})
    state.wait_for_everyone()
    return [{**rec, "index": i, "name": f"{i:05d}"} for i, rec in enumerate(cached)]
