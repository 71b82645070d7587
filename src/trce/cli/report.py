"""`trce report`: one self-contained HTML report (plus its JSON and a Markdown table) from `trce eval` runs —
one `trce.report` call."""

from __future__ import annotations

import logging
from pathlib import Path

from trce.cli.common import parser_kwargs
from trce.errors import TrceError
from trce.utils import io

log = logging.getLogger("trce")


def register(sub) -> None:
    p = sub.add_parser("report", **parser_kwargs(
        "Summarise `trce eval` runs: a paper-style results table, before/after image grids on the same seeds, an "
        "ASR-vs-preservation plot; one self-contained HTML file, its JSON beside it, the Markdown table on stdout.",
        "  trce report runs/eval-orig runs/eval-uce runs/eval-trce --out report.html\n"
        "  trce report runs/eval-* --out report.html --markdown table.md --title 'Erasing red'\n"
        "  trce report runs/i2p-orig runs/i2p-trce runs/mma-trce --out nudity.html --grid-size 4\n"
        "  trce report runs/i2p-trce --out private.html --no-blur     # unsafe images unblurred\n"))
    p.add_argument("runs", nargs="+", metavar="RUN", help="`trce eval` output folders (each holds metrics.json)")
    p.add_argument("--out", default="report.html",
                   help="the HTML file; the JSON it is drawn from goes beside it (report.html -> report.json)")
    p.add_argument("--markdown", default=None, metavar="FILE", help="also write the Markdown table to FILE")
    p.add_argument("--no-blur", action="store_true",
                   help="show real-suite images the detector judged unsafe as generated (blurred by default)")
    p.add_argument("--grid-size", type=int, default=8, help="prompts per group in the before/after grids (0: none)")
    p.add_argument("--title", default=None, help="the report's title (when omitted: 'trce report — ' and the suite names)")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from trce.report import write_report

    out = Path(args.out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise TrceError(f"--out must end in .html, got {args.out!r}")
    if args.grid_size < 0:
        raise TrceError(f"--grid-size must be 0 or more, got {args.grid_size}")
    io.check_writable(out, "out", kind="file")
    if args.markdown is not None:
        io.check_writable(args.markdown, "markdown", kind="file")
    markdown = write_report(args.runs, out, markdown=args.markdown, grid_size=args.grid_size, title=args.title,
                            blur=not args.no_blur)
    log.info("wrote %s (%.1f MB) and %s", out, out.stat().st_size / 1e6, out.with_suffix(".json"))
    print(markdown, end="")
    return 0
