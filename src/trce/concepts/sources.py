"""Where preservation prompts come from: a spec's own list, a prompt file, COCO's captions in the shared data folder,
or ShapeWorld captions (`Preservation.source`, one of `SOURCES`)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from trce.concepts.model import Preservation
from trce.errors import TrceError

SOURCES = ("prompts", "file", "coco", "shapeworld-captions", "none")
COCO_FILE = Path("prompts") / "coco_30k.csv"


def data_dir(explicit: str | Path | None = None) -> Path | None:
    """The shared data folder: `explicit`, else $TRCE_DATA, else None."""
    value = explicit if explicit is not None else os.environ.get("TRCE_DATA")
    return Path(value).expanduser() if value else None


def read_preservation(p: Preservation, concept: str, attribute: str | None, values: tuple[str, ...],
                      data: str | Path | None = None) -> list[str]:
    """The prompts of concept `concept`'s preservation `p` (`attribute` and `values`: a ShapeWorld spec's erased
    values, which `shapeworld-captions` never shows; `data`: the folder holding `prompts/coco_30k.csv`)."""
    if p.source == "none":
        return []
    if p.source == "prompts":
        return subset(list(p.prompts), p.n, p.seed)
    if p.source == "shapeworld-captions":
        from trce.concepts.shapeworld import shapeworld_captions

        return shapeworld_captions(attribute or "", values, p.n or 1000, p.seed)
    if p.source == "coco":
        folder = data_dir(data)
        if folder is None:
            raise TrceError(f"concept {concept!r} preserves COCO captions: pass --data DIR (a folder holding "
                            f"{COCO_FILE}) or set TRCE_DATA")
        path = folder / COCO_FILE
        if not path.exists():
            raise TrceError(f"concept {concept!r} preserves COCO captions, but {path} does not exist; "
                            "pass --data DIR with a folder holding prompts/coco_30k.csv")
        return subset(read_prompt_file(path, "prompt"), p.n, p.seed)
    path = Path(p.file or "").expanduser()
    if not path.is_absolute() and not path.exists() and data_dir(data) is not None:
        path = data_dir(data) / path  # type: ignore[operator]
    return subset(read_prompt_file(path, p.column), p.n, p.seed)


def read_prompt_file(path: str | Path, column: str = "prompt") -> list[str]:
    """Prompts from a CSV file (one column) or a text file (one prompt a line)."""
    path = Path(path)
    if not path.exists():
        raise TrceError(f"preservation prompt file {path} does not exist")
    if path.is_dir():
        raise TrceError(f"preservation prompt file {path} is a folder; give a CSV or TXT file")
    try:
        if path.suffix.lower() != ".csv":
            return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if column not in (reader.fieldnames or []):
                columns = ", ".join(f for f in reader.fieldnames or [] if f)
                raise TrceError(f"{path} has no column {column!r}; columns: {columns}")
            return [row[column].strip() for row in reader if (row.get(column) or "").strip()]
    except UnicodeDecodeError as exc:
        raise TrceError(f"preservation prompt file {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except csv.Error as exc:
        raise TrceError(f"preservation prompt file {path} is not a readable CSV: {exc}") from exc


def subset(prompts: list[str], n: int | None, seed: int) -> list[str]:
    """A seeded random subset of `n` prompts, in file order (all of them when n is None or larger)."""
    if n is None or n >= len(prompts):
        return prompts
    import numpy as np

    keep = np.sort(np.random.default_rng(seed).choice(len(prompts), size=n, replace=False))
    return [prompts[i] for i in keep]
