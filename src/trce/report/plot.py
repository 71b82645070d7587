"""`asr_preservation_plot`: the report's ASR-vs-preservation scatter, as PNG bytes.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no display, no global backend
switch). One panel per entry of `report["plot"]["panels"]`; one point per table row with its 95%
interval as a vertical error bar; a row keeps its colour in every panel. Labels are placed after the layout,
where they cover no marker, error bar or other label (methods often crowd the ideal corner).
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


# Offsets (points) tried for a label, nearest first: beside the point, then stacked above and below it.
_OFFSETS = [(dx, dy) for dy in (6, -6, 18, -18, 30, -30, 42, -42, 54, -54) for dx in (8, -8)]


def _place_labels(ax, labels: list[tuple[float, float, str, str, tuple | None]], renderer) -> None:
    """Label each point where its text covers no marker, error bar or other label and stays inside the axes.

    Measures text in display pixels, so the figure must have been drawn once (final layout). A label
    pushed away from its point gets a thin leader line; where nothing fits, the first place is kept.
    """
    from matplotlib.transforms import Bbox

    frame = ax.get_window_extent(renderer)
    px = renderer.points_to_pixels(1.0)
    taken = [Bbox.from_bounds(*(ax.transData.transform((x, y)) - 6 * px), 12 * px, 12 * px) for x, y, *_ in labels]
    for x, y, *_, ci in labels:  # the error bars, with their caps
        if ci:
            (u, v0), (_, v1) = ax.transData.transform([(x, ci[0]), (x, ci[1])])
            taken.append(Bbox([[u - 4 * px, min(v0, v1)], [u + 4 * px, max(v0, v1)]]))
    for x, y, color, text, _ in labels:
        right = (ax.transData.transform((x, y))[0] - frame.x0) / max(frame.width, 1.0) > 0.6
        ann = ax.annotate(text, (x, y), xytext=(0, 0), textcoords="offset points", fontsize=8.5, color=color,
                          zorder=4)

        tries = [(-dx if right else dx, dy) for dx, dy in _OFFSETS]
        chosen = next(((dx, dy, box) for dx, dy in tries if _fits(box := _move(ann, dx, dy, renderer), frame, taken)),
                      None)
        if chosen is None:  # crowded: the first place, beside the point
            chosen = (*tries[0], _move(ann, *tries[0], renderer))
        dx, dy, box = chosen
        if abs(dy) > 6:  # a leader line from the label back to its point
            ax.annotate("", (x, y), xytext=(dx, dy), textcoords="offset points", zorder=2,
                        arrowprops={"arrowstyle": "-", "color": color, "lw": 0.6, "shrinkA": 0, "shrinkB": 5})
        taken.append(box)


def _move(ann, dx: float, dy: float, renderer):
    """Put a label at offset (dx, dy) points, aligned away from its point; returns its box in pixels."""
    ann.set_position((dx, dy))
    ann.set_ha("left" if dx > 0 else "right")
    ann.set_va("bottom" if dy > 0 else "top")
    return ann.get_window_extent(renderer)


def _fits(box, frame, taken: list) -> bool:
    """Inside the axes and over nothing already taken."""
    inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
    return inside and not any(box.overlaps(b) for b in taken)


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
    pending = []  # (axes, labels): placed once the layout is final
    for k, panel in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        labels: list[tuple[float, float, str, str, tuple | None]] = []
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
                               else f"{p['label']} ({series['name']})", p.get("y_ci")))
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
        pending.append((ax, labels))
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
    canvas = FigureCanvasAgg(fig)
    if pending:
        canvas.draw()  # the constrained layout, so that text can be measured where it will be drawn
        renderer = canvas.get_renderer()
        for ax, labels in pending:
            _place_labels(ax, labels, renderer)
        fig.set_layout_engine("none")  # keep that layout: the labels were placed for it
    buf = io.BytesIO()
    canvas.print_png(buf)
    return buf.getvalue()
