"""`asr_preservation_plot`: the report's ASR-vs-preservation scatter, as PNG bytes.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no display, no global backend
switch). One panel per entry of `report["plot"]["panels"]`; one point per table row with its 95%
interval as a vertical error bar; a row keeps its colour in every panel.
"""

from __future__ import annotations

import io
import math

_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974",
           "#64b5cd")
_ORIGINAL = "#222222"
_MARKERS = ("o", "^", "s", "D")


def _colors(panels: list[dict]) -> dict[str, str]:
    out: dict[str, str] = {}
    for panel in panels:
        for series in panel["series"]:
            for p in series["points"]:
                if p["label"] not in out:
                    out[p["label"]] = _ORIGINAL if p.get("original") else _COLORS[
                        sum(1 for v in out.values() if v != _ORIGINAL) % len(_COLORS)]
    return out


def _place_labels(ax, labels: list[tuple[float, float, str, str]]) -> None:
    """Label each point beside it: to the left near the right edge, stacked when points (nearly) coincide."""
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    placed: list[tuple[float, float]] = []
    for x, y, color, text in labels:
        u, v = (x - x0) / ((x1 - x0) or 1.0), (y - y0) / ((y1 - y0) or 1.0)  # axes fractions
        clash = sum(1 for pu, pv in placed if abs(pu - u) < 0.15 and abs(pv - v) < 0.05)
        placed.append((u, v))
        right = u > 0.6
        ax.annotate(text, (x, y), xytext=(-8 if right else 8, 6 - 12 * clash), textcoords="offset points",
                    ha="right" if right else "left", fontsize=8.5, color=color, zorder=4)


def asr_preservation_plot(report: dict, dpi: int = 110) -> bytes:
    """PNG bytes of the report's plot panels (a small "nothing to plot" image when there are none)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    panels = report.get("plot", {}).get("panels", [])
    ncols = min(2, max(1, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig = Figure(figsize=(6.4 * ncols, 4.6 * nrows), dpi=dpi, layout="constrained")
    if not panels:
        fig.set_size_inches(5, 1.2)
        fig.text(0.5, 0.5, "nothing to plot: no run has both an ASR and a preservation number", ha="center",
                 va="center", color="#555555")
    colors = _colors(panels)
    for k, panel in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        labels: list[tuple[float, float, str, str]] = []
        for s_idx, series in enumerate(panel["series"]):
            marker = _MARKERS[s_idx % len(_MARKERS)]
            for p in series["points"]:
                c = colors[p["label"]]
                yerr = None
                if p.get("y_ci"):
                    lo, hi = p["y_ci"]
                    yerr = [[max(0.0, p["y"] - lo)], [max(0.0, hi - p["y"])]]
                ax.errorbar([p["x"]], [p["y"]], yerr=yerr, fmt=marker, color=c, ecolor=c, elinewidth=1.2, capsize=4,
                            markersize=8, markerfacecolor=c if s_idx == 0 else "white", markeredgewidth=1.5,
                            alpha=0.95, zorder=3)
                labels.append((p["x"], p["y"], c, p["label"] if len(panel["series"]) == 1
                               else f"{p['label']} ({series['name']})"))
        ax.set_title(panel["title"], fontsize=11, loc="left")
        ax.set_xlabel(panel["x_label"], fontsize=9.5)
        ax.set_ylabel(panel["y_label"], fontsize=9.5)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_ylim(-0.04, 1.06)
        xs = [p["x"] for s in panel["series"] for p in s["points"]]
        if panel.get("x_kind") == "rate":
            lo, hi = min(xs), max(1.0, max(xs))
            span = max(hi - lo, 0.2)
            ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0 if span >= 0.1 else 1))
            ax.set_xlim(max(-0.02, hi - 1.15 * span), hi + 0.05 * span)
        elif panel.get("x_kind") == "category":
            cats = panel.get("categories") or []
            ax.set_xticks(range(len(cats)), cats, rotation=20, ha="right", fontsize=8.5)
            ax.set_xlim(-0.6, len(cats) - 0.4)
        else:
            span = (max(xs) - min(xs)) or max(abs(max(xs)), 1e-3)
            ax.set_xlim(min(xs) - 0.1 * span, max(xs) + 0.1 * span)
        _place_labels(ax, labels)
        ax.grid(True, color="#dddddd", linewidth=0.8, zorder=0)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        if panel.get("x_better") in ("lower", "higher"):
            # the ideal erasure: ASR 0 at the best preservation (low FD/FID, high accuracy/CLIP score)
            ax.set_title("better: " + ("↘" if panel["x_better"] == "higher" else "↙"), loc="right", fontsize=9.5,
                         color="#2a7a3b", style="italic")
        if len(panel["series"]) > 1:
            from matplotlib.lines import Line2D

            handles = [Line2D([], [], marker=_MARKERS[i % len(_MARKERS)], linestyle="", color="#555555",
                              markerfacecolor="#555555" if i == 0 else "white", label=s["name"])
                       for i, s in enumerate(panel["series"])]
            ax.legend(handles=handles, fontsize=8.5, frameon=False, loc="upper right")
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return buf.getvalue()
