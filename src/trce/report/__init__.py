"""Reports of `trce eval` runs: JSON first, then Markdown tables, an ASR-vs-preservation plot and one HTML page.

    report = build_report([Path("runs/eval-orig"), Path("runs/eval-uce")])   # the JSON document
    render_markdown(report)          # Table-1-shaped Markdown
    asr_preservation_plot(report)    # PNG bytes
    render_html(report)              # one self-contained page (images inlined)
"""

from __future__ import annotations

from trce.report.build import build_report
from trce.report.html import render_html
from trce.report.outputs import check_outputs
from trce.report.plot import asr_preservation_plot
from trce.report.runs import load_metrics
from trce.report.tables import render_markdown

__all__ = ["asr_preservation_plot", "build_report", "check_outputs", "load_metrics", "render_html", "render_markdown", "write_report"]


def write_report(runs, out, *, markdown=None, grid_size: int = 8, title: str | None = None, blur: bool = True) -> str:
    """Write `out` (HTML) and its JSON beside it (report.html -> report.json); returns the Markdown table.

    An output that exists must be an earlier report of its kind (`check_outputs`): a report never writes over a
    run's metrics.json or any other file.

    JSON first: the Markdown and the page are drawn from the document as written.
    """
    import json
    import os
    from pathlib import Path

    from trce.utils import io

    if isinstance(runs, (str, os.PathLike)):  # one run folder
        runs = [runs]
    out = Path(out)
    check_outputs(runs, out, markdown)  # before any work: never over an input's files nor any other non-report
    report = build_report([Path(r) for r in runs], grid_size=grid_size, title=title, blur=blur)
    json_path = out.with_suffix(".json")
    io.write_json(json_path, report)
    report = json.loads(json_path.read_text(encoding="utf-8"))
    table = render_markdown(report)
    page = render_html(report, plot_png=asr_preservation_plot(report) if report["plot"]["panels"] else None)
    io.write_text(out, page)
    if markdown:
        io.write_text(markdown, table)
    return table


from trce.utils import callable_module

callable_module(__name__, write_report)  # `trce.report(runs, out)`
