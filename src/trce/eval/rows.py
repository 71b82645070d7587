"""Generating a run's rows (`generate_rows`): each prompt row's image drawn, judged by the detector and recorded in
folder/rows.jsonl; rows already finished are skipped, so a rerun resumes (`trce.eval.resume`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from trce.errors import TrceError
from trce.eval import resume
from trce.eval.detectors import Detector
from trce.eval.prompts import PromptRow
from trce.generate import GenSettings, generate_iter
from trce.utils import io
from trce.utils.processes import SingleState
from trce.utils.records import Records

log = logging.getLogger(__name__)

# a run folder's layout: its rows, their images and the original model's (reference) rows and images
ROWS = "rows.jsonl"
IMAGES = "images"
REFERENCE = "reference"


def offset_seed(seed: int, offset: int) -> int:
    """The seed of a row under seed offset `offset`: its own for 0, else a hash of (seed, offset).

    Hashing (not seed + offset) keeps repeats independent: consecutive rows often have consecutive
    seeds, and a shifted seed would reuse a neighbour's initial noise.
    """
    if offset == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(offset)]).generate_state(1, dtype=np.uint32)[0])


def _matches(rec: dict | None, row: PromptRow, seed: int, guidance: float, folder: Path) -> bool:
    return (rec is not None and rec.get("prompt") == row.prompt and rec.get("seed") == seed
            and rec.get("guidance") == guidance and (folder / IMAGES / f"{rec['name']}.png").exists())


def _record(index: int, name: str, row: PromptRow, seed: int, guidance: float, result: dict) -> dict:
    """A finished row's record; `result` holds the detector's verdict and scores."""
    return {"index": index, "name": name, "prompt": row.prompt, "seed": seed, "guidance": guidance,
            "group": row.category, "categories": list(row.categories), "case_number": row.case_number,
            "verdict": result["verdict"], "scores": result["scores"], "extra": row.extra}


def generate_rows(pipe, rows: Sequence[PromptRow], seeds: Sequence[int], guidances: Sequence[float], folder: Path,
                  settings: GenSettings, detector: Detector, state=None, names: Sequence[str] | None = None,
                  progress: bool = True, desc: str = "eval", embeds: torch.Tensor | None = None) -> list[dict]:
    """Generate, judge and record every row not already finished in `folder`; returns the records in row order.

    Images go to folder/images/{name}.png (name defaults to the zero-padded row index), records to
    folder/rows.jsonl (`trce.utils.records`: appended and fsynced per batch, sharded over processes). With
    `embeds` ((N, L, D) conditionings: soft prompts) the images are drawn from them, not from the rows' text.
    """
    state = state if state is not None else SingleState()
    by_index = names is None  # rows named by their index: a rerun asking for other rows moves them (`resume`)
    names = list(names) if names is not None else [f"{i:05d}" for i in range(len(rows))]
    folder = Path(folder)
    records = Records(folder / ROWS, "name", state, order=lambda r: (r.get("index", 0), r["name"]))
    if state.is_main_process:
        (folder / IMAGES).mkdir(parents=True, exist_ok=True)
        if by_index:
            def remake(i: int, rec: dict) -> dict:
                return {**rec, **_record(i, names[i], rows[i], seeds[i], guidances[i], rec)}

            resume.reconcile(folder, [resume.identity(r.prompt, s, g) for r, s, g in zip(rows, seeds, guidances)],
                             names, IMAGES, ROWS, remake)
    done = records.done()
    todo = [i for i in range(len(rows)) if not _matches(done.get(names[i]), rows[i], seeds[i], guidances[i], folder)]
    if len(todo) < len(rows) and state.is_main_process:
        log.info("%s: %d of %d rows already done, generating %d", folder, len(rows) - len(todo), len(rows), len(todo))
    with state.split_between_processes(todo) as mine, records.appender() as append:
        if mine:
            batches = generate_iter(pipe, [rows[i].prompt for i in mine], [seeds[i] for i in mine], settings,
                                    [guidances[i] for i in mine], progress=progress and state.is_main_process,
                                    desc=desc, embeds=embeds[mine] if embeds is not None else None)
            for local, images in batches:
                idx = [mine[j] for j in local]
                results = detector.detect(images, [rows[i] for i in idx])
                for i, img in zip(idx, images):
                    io.save_png(folder / IMAGES / f"{names[i]}.png", img)
                append([_record(i, names[i], rows[i], seeds[i], guidances[i], res) for i, res in zip(idx, results)])
    by_name = records.collect()
    missing = [names[i] for i in range(len(rows)) if names[i] not in by_name]
    if missing:
        raise TrceError(f"{folder}: rows {', '.join(missing[:5])} were not written; rerun the same command to finish")
    return [by_name[n] for n in names]
