"""A resumed folder of index-named rows made to hold exactly the rows a rerun asks for.

`trce eval` names its images by row index (images/00000.png) and records them in rows.jsonl. A rerun that asks
for other rows (a grown or shrunk `--limit`) puts other prompts at those indices; without care it would redraw
rows it already has and leave rows it no longer asks for in rows.jsonl. `reconcile` matches the finished rows by
what makes an image (prompt, seed, guidance), moves each one it still needs to its new index, and sets the rest
aside in `.unused/` (by identity, taken back when asked for again), so the folder then holds exactly the rows of
a fresh run at the new setting, and only the new ones are drawn.

Kill safety: rows.jsonl is first cut to the rows already in place, then images move, then the moved rows are
recorded; an interrupted reconcile loses track of at most the rows it was moving (they are drawn again), never
pairs a record with another row's image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from trce.utils import io
from trce.utils.records import Records

log = logging.getLogger(__name__)
UNUSED = ".unused"
_STAGING = ".move-"


def identity(prompt: str, seed: int, guidance: float) -> str:
    """What an image depends on within one folder (model, steps and size are the folder's key)."""
    return hashlib.sha1(json.dumps([prompt, int(seed), float(guidance)]).encode()).hexdigest()[:20]


def _of(rec: dict) -> str | None:
    try:
        return identity(rec["prompt"], rec["seed"], rec["guidance"])
    except (KeyError, TypeError, ValueError):
        return None


def reconcile(folder: Path, wanted: Sequence[str], names: Sequence[str], images: str, rows_file: str,
              remake: Callable[[int, dict], dict]) -> None:
    """Make `folder` hold finished rows only at the names asked for: `wanted[i]` is the identity of the row to be
    named `names[i]`; `remake(i, record)` gives a finished record moved to row i (its index, name and row fields).
    Main process only, before the run reads what is done."""
    folder = Path(folder)
    path = folder / rows_file
    if not path.exists():
        return
    img = folder / images
    for left in img.glob(f"{_STAGING}*.png") if img.is_dir() else ():  # from an interrupted reconcile
        left.unlink()
    current = Records(path, "name").merge()
    at = {n: i for i, n in enumerate(names)}

    def in_place(rec: dict) -> bool:
        i = at.get(rec["name"])
        return i is not None and _of(rec) == wanted[i] and (img / f"{rec['name']}.png").exists()

    kept = {n: r for n, r in current.items() if in_place(r)}
    if len(kept) == len(current):
        return  # nothing to move or set aside (the usual resume)
    spare = Records(folder / UNUSED / rows_file, "id")
    spares = spare.merge() if spare.path.exists() else {}
    free = {wanted[i]: i for i, n in enumerate(names) if n not in kept}
    # 1. rows.jsonl cut to the rows in place: a kill from here on never pairs a record with a moved image
    _write(path, kept.values())
    # 2. every other finished image out of the way first (targets may be each other's names), then placed
    staged: list[tuple[dict, Path]] = []
    for name, rec in current.items():
        src = img / f"{name}.png"
        if name in kept or not src.exists():
            continue
        tmp = img / f"{_STAGING}{name}.png"
        os.replace(src, tmp)
        staged.append((rec, tmp))
    placed: dict[str, dict] = {}
    aside: dict[str, dict] = {}
    for rec, tmp in staged:
        ident = _of(rec)
        i = free.pop(ident, None) if ident is not None else None
        if i is not None:
            os.replace(tmp, img / f"{names[i]}.png")
            placed[names[i]] = remake(i, rec)
        elif ident is not None:
            (folder / UNUSED / images).mkdir(parents=True, exist_ok=True)
            os.replace(tmp, folder / UNUSED / images / f"{ident}.png")
            aside[ident] = {**rec, "id": ident}
        else:
            tmp.unlink()
    taken = []
    for ident, i in list(free.items()):  # rows asked for again: back from .unused
        src = folder / UNUSED / images / f"{ident}.png"
        if ident in spares and src.exists():
            os.replace(src, img / f"{names[i]}.png")
            rec = {k: v for k, v in spares[ident].items() if k != "id"}
            placed[names[i]] = remake(i, rec)
            taken.append(ident)
    # 3. the moved rows recorded, the set-aside ones kept for a later rerun
    _write(path, [*kept.values(), *placed.values()])
    if aside or taken:
        left = {k: v for k, v in spares.items() if k not in taken} | aside
        _write(spare.path, left.values(), key="id")
    log.info("%s: %d finished rows kept in place, %d moved to their new index, %d set aside in %s (not asked for)",
             folder, len(kept), len(placed), len(aside), UNUSED)


def _write(path: Path, records, key: str = "name") -> None:
    ordered = sorted(records, key=lambda r: (r.get("index", 0), r[key]))
    path.parent.mkdir(parents=True, exist_ok=True)
    io.write_text(path, "".join(json.dumps(r) + "\n" for r in ordered))
