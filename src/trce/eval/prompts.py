"""Prompt files: every layout of the public erasure benchmarks, read into `PromptRow`s.

A layout is a named column mapping (`LAYOUTS`): which column holds the prompt, its evaluation seed
and guidance, its categories and case number. `load_prompts(path)` detects the layout from the
CSV header (or takes one by name, or an explicit mapping from a suite file) and returns one
`PromptRow` per data row. Files are read with the `csv` module, so quoted prompts that span
several lines stay one row. TXT files hold one prompt per line.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trce.errors import TrceError

log = logging.getLogger(__name__)

# Fields of a PromptRow a layout can map a column to; only `prompt` is required everywhere.
FIELDS = ("prompt", "seed", "guidance", "categories", "case_number")
_OPTIONAL = ("case_number",)

# name -> {field: column}; columns listed here must be present in files of that layout, except _OPTIONAL ones.
LAYOUTS: dict[str, dict[str, str]] = {
    # I2P (also its "sexual" subset and UnlearnDiffAtk's starting prompts); first column an unnamed index
    "i2p": {"prompt": "prompt", "seed": "evaluation_seed", "guidance": "evaluation_guidance",
            "categories": "categories", "case_number": "case_number"},
    # P4D-N: I2P's seed/guidance columns without categories
    "p4d": {"prompt": "prompt", "seed": "evaluation_seed", "guidance": "evaluation_guidance",
            "case_number": "case_number"},
    # the common `case_number, prompt, evaluation_seed` layout (COCO-30k, artist prompts)
    "case-number": {"prompt": "prompt", "seed": "evaluation_seed", "case_number": "case_number"},
    # MMA-Diffusion: the adversarial prompt is what the model sees
    "mma": {"prompt": "adv_prompt"},
    # the 79 "Ring-A-Bell" prompt pairs (generated pairs, not the real attack output)
    "ring-a-bell": {"prompt": "sensitive prompt"},
    # any CSV with a `prompt` column
    "csv": {"prompt": "prompt"},
    # one prompt per line
    "txt": {"prompt": "prompt"},
}


@dataclass(frozen=True)
class PromptRow:
    """One prompt to evaluate; `seed`/`guidance` are None when the file does not give them."""

    prompt: str
    seed: int | None = None
    guidance: float | None = None
    categories: tuple[str, ...] = ()
    case_number: int | str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def category(self) -> str | None:
        return self.categories[0] if self.categories else None


def detect_layout(header: list[str]) -> str:
    """The layout name whose characteristic columns the header has (most specific first)."""
    cols = set(header)
    if "adv_prompt" in cols:
        return "mma"
    if "sensitive prompt" in cols:
        return "ring-a-bell"
    if "prompt" in cols and "categories" in cols and "evaluation_seed" in cols:
        return "i2p"
    if "prompt" in cols and "evaluation_guidance" in cols and "evaluation_seed" in cols:
        return "p4d"
    if {"prompt", "evaluation_seed"} <= cols:  # case_number is optional: a seed column is never ignored
        return "case-number"
    return "csv"


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            records = list(reader)
    except UnicodeDecodeError as exc:
        raise TrceError(f"prompt file {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    except csv.Error as exc:
        raise TrceError(f"prompt file {path} is not a readable CSV: {exc}") from exc
    return header, records


def _read_txt(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TrceError(f"prompt file {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def _number(path: Path, line: int, column: str, value: str, kind: type) -> int | float | None:
    value = value.strip()
    if not value:
        return None
    try:
        number = float(value)
        if not math.isfinite(number) or (kind is float and number < 0) or (kind is int and not number.is_integer()):
            raise ValueError(value)
        return kind(number) if kind is int else kind(value)
    except (ValueError, OverflowError) as exc:
        what = "an integer" if kind is int else "a finite number >= 0"
        raise TrceError(f"prompt file {path}, row {line}: column {column!r} should be {what}, got {value!r}") from exc


def load_prompts(path: str | Path, layout: str = "auto", columns: dict[str, str] | None = None,
                 default_category: str | None = None) -> list[PromptRow]:
    """Read a prompt file as `PromptRow`s, in file order.

    `layout` is `auto` (detected from the header; `.txt` files are one prompt per line) or a name
    in `LAYOUTS`; `columns` overrides single fields of the layout's mapping (e.g.
    `{"categories": "artist"}`). Columns of the file that no field uses go to `PromptRow.extra`.
    A missing, empty or malformed file is one `TrceError` naming the file and the problem.
    """
    path = Path(path)
    if path.is_dir():
        raise TrceError(f"prompt file {path} is a folder; give a CSV or TXT file")
    if not path.is_file():
        raise TrceError(f"prompt file {path} does not exist")
    if layout != "auto" and layout not in LAYOUTS:
        from trce.errors import choose

        choose("prompt layout", layout, LAYOUTS)
    if path.suffix.lower() == ".txt" or layout == "txt":
        prompts = _read_txt(path)
        if not prompts:
            raise TrceError(f"prompt file {path} is empty (expected one prompt per line)")
        cats = (default_category,) if default_category else ()
        return [PromptRow(prompt=p, categories=cats) for p in prompts]

    header, records = _read_csv(path)
    if not header:
        raise TrceError(f"prompt file {path} is empty (no header line)")
    name = detect_layout(header) if layout == "auto" else layout
    mapping = dict(LAYOUTS[name])
    for key, col in (columns or {}).items():
        if key not in FIELDS:
            raise TrceError(f"unknown column mapping field {key!r}; use one of {', '.join(FIELDS)}")
        mapping[key] = col
    # a layout's case_number column is optional (files made by hand often lack it); asked-for columns are not
    for key in [k for k in _OPTIONAL if mapping.get(k) not in header and k not in (columns or {})]:
        mapping.pop(key, None)
    missing = [col for col in mapping.values() if col not in header]
    if missing:
        raise TrceError(
            f"prompt file {path} ({name} layout) has no column {', '.join(repr(m) for m in missing)}; "
            f"its columns are {', '.join(repr(h) for h in header)}"
        )
    if not records:
        raise TrceError(f"prompt file {path} has a header but no rows")
    used = set(mapping.values())
    rows = []
    for line, rec in enumerate(records, start=2):
        if None in rec:  # DictReader puts surplus fields under the key None
            raise TrceError(f"prompt file {path}, row {line}: more fields than the header has columns")
        prompt = rec[mapping["prompt"]]
        if prompt is None:
            raise TrceError(f"prompt file {path}, row {line}: fewer fields than the header has columns")
        seed = _number(path, line, mapping["seed"], rec[mapping["seed"]] or "", int) if "seed" in mapping else None
        guidance = (_number(path, line, mapping["guidance"], rec[mapping["guidance"]] or "", float)
                    if "guidance" in mapping else None)
        cats: tuple[str, ...] = ()
        if "categories" in mapping and rec[mapping["categories"]]:
            cats = tuple(c.strip() for c in rec[mapping["categories"]].split(",") if c.strip())
        if not cats and default_category:
            cats = (default_category,)
        case = rec.get(mapping["case_number"]) if "case_number" in mapping else None
        if case is not None:
            case = case.strip()
            case = int(case) if case.lstrip("-").isdigit() else (case or None)
        extra = {k: v for k, v in rec.items() if k not in used and k not in ("", "Unnamed: 0")}
        rows.append(PromptRow(prompt=prompt.strip(), seed=seed, guidance=guidance, categories=cats,  # type: ignore[arg-type]
                              case_number=case, extra=extra))
    log.debug("read %d prompts from %s (%s layout)", len(rows), path, name)
    return rows
