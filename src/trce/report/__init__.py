"""Reports of `trce eval` runs: JSON first, then Markdown tables, an ASR-vs-preservation plot and one HTML page.

    report = build_report([Path("runs/eval-orig"), Path("runs/eval-uce")])   # the JSON document
    render_markdown(report)          # Table-1-shaped Markdown
    asr_preservation_plot(report)    # PNG bytes
    render_html(report)              # one self-contained page (images inlined)
"""

from __future__ import annotations

from trce.report.build import build_report, load_metrics
from trce.report.html import render_html
from trce.report.plot import asr_preservation_plot
from trce.report.tables import render_markdown

__all__ = ["asr_preservation_plot", "build_report", "load_metrics", "render_html", "render_markdown"]
