"""`check_outputs`: a report never writes over its inputs, nor over any file that is not an earlier report.

A report writes up to three files: the HTML page (`out`), its JSON beside it (report.html -> report.json) and the
Markdown table (`markdown`). Before any work each one is checked: the three are different files; one that exists must
be an earlier trce report of the same kind (a page made by `render_html`, a JSON document of format "trce-report", a
Markdown table made by `render_markdown`), which is replaced. Anything else — an eval run's metrics.json or rows.jsonl,
a patch's patch.json, a user's notes — is refused with one error naming the file (and the run folder holding it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from trce.errors import TrceError
from trce.utils import folders as run_folders

GENERATOR = "trce report"  # the page's <meta name='generator'>
_HEAD = 65536  # bytes of a page or table read to recognise it


def _read_head(path: Path, size: int = _HEAD) -> str:
    with open(path, "rb") as f:
        return f.read(size).decode("utf-8", errors="replace")


def is_report_html(path: Path) -> bool:
    """A page `render_html` made: its generator tag (older pages: its subtitle and footer)."""
    try:
        head = _read_head(path)
        if f"<meta name='generator' content='{GENERATOR}'>" in head:
            return True
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return False
    return "<p class='subtitle'>Concept-erasure evaluation · trce " in head and "<footer>Made by trce " in tail


def is_report_json(path: Path) -> bool:
    """A JSON document `build_report` made (format "trce-report")."""
    from trce.report.build import REPORT_FORMAT

    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == REPORT_FORMAT


def is_report_markdown(path: Path) -> bool:
    """A Markdown table `render_markdown` made: a title line, then tables whose first column is Method."""
    try:
        if path.stat().st_size > 4 * _HEAD:
            return False
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return text.startswith("# ") and "\n| Method | " in text


_KINDS = {"HTML page": is_report_html, "JSON": is_report_json, "Markdown table": is_report_markdown}


def _run_folder(run: str | os.PathLike) -> Path:
    path = Path(run)
    if path.name == "metrics.json" and path.is_file():
        path = path.parent
    return Path(os.path.realpath(path))


def _owner(path: Path, runs: Sequence[Path]) -> Path | None:
    """The input run folder `path` is in (or is), if any."""
    for run in runs:
        if path == run or run in path.parents:
            return run
    return None


def check_outputs(runs: Sequence[str | os.PathLike], out: str | os.PathLike,
                  markdown: str | os.PathLike | None = None) -> None:
    """Refuse, before any work, a report output that is another output, a folder, or an existing file that is not an
    earlier trce report of its kind (an input run's metrics.json, rows.jsonl... included)."""
    out = Path(out)
    outputs = [("out", "HTML page", out, out), ("out", "JSON", out.with_suffix(".json"), out)]
    if markdown is not None:
        outputs.append(("markdown", "Markdown table", Path(markdown), Path(markdown)))
    folders = [_run_folder(r) for r in runs]
    seen: dict[str, str] = {}
    for field, kind, path, given in outputs:
        run_folders.check_outside(path, field)  # never inside a patch, eval, attack... (its command owns it all)
        real = os.path.realpath(path.expanduser())
        if real in seen:
            raise TrceError(f"{field} {given} is also the report's {seen[real]}; give each output its own name",
                            field=field)
        seen[real] = kind
        where = _owner(Path(real), folders)
        inside = f" (a file of the input run folder {where})" if where is not None else ""
        what = (f"{field} {given} would write its JSON to {path}, which" if kind == "JSON"
                else f"{field} {given}")
        if Path(real).is_dir():
            folder = "the input run folder" if where is not None and Path(real) == where else "a folder"
            raise TrceError(f"{what} is {folder}, not a file; choose another name", field=field)
        if Path(real).exists() and not _KINDS[kind](Path(real)):
            raise TrceError(f"{what} exists and is not a trce report {kind}{inside}: a report never writes "
                            "over another file; choose another name", field=field)
