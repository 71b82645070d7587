"""The report's tables as Markdown, and the cell formatting the HTML shares.

`render_markdown(report)` draws the `tables` of a `build_report` document: one Markdown table per
table, rows = models/patches (the original first), cells "value [95% CI]", the best patched value
per column in bold, "†" on numbers taken from a patched run's reference images.
"""

from __future__ import annotations


def fmt_number(value: float) -> str:
    """FD / FID / CLIP score: enough digits to compare, few enough to read."""
    a = abs(value)
    if a == 0:
        return "0"
    if a < 0.01:
        return f"{value:.2g}"
    if a >= 100:
        return f"{value:.1f}"
    if a >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt_value(cell: dict | None, kind: str) -> str:
    """The cell's value alone: "12.5%" for rates, "3.21" for numbers, "–" when there is none."""
    if not cell or cell.get("value") is None:
        return "–"
    v = cell["value"]
    text = f"{100 * v:.1f}%" if kind == "rate" else fmt_number(v)
    return text + ("†" if cell.get("derived") else "")


def fmt_ci(cell: dict | None, kind: str) -> str:
    """The 95% interval as "[lo, hi]" in the value's unit, or "" without one."""
    if not cell or not cell.get("ci") or cell.get("value") is None:
        return ""
    lo, hi = cell["ci"]
    if kind == "rate":
        return f"[{100 * lo:.1f}, {100 * hi:.1f}]"
    return f"[{fmt_number(lo)}, {fmt_number(hi)}]"


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_table(table: dict) -> str:
    """One table as GitHub-flavoured Markdown (header, alignment row, one line per row)."""
    cols = table["columns"]
    head = ["Method"] + [_md_escape(c["short"]) for c in cols]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join([":---"] + ["---:"] * len(cols)) + " |"]
    for row in table["rows"]:
        cells = []
        for c in cols:
            cell = row["cells"].get(c["key"])
            text = fmt_value(cell, c["kind"])
            ci = fmt_ci(cell, c["kind"])
            if cell and cell.get("best"):
                text = f"**{text}**"
            cells.append(f"{text} {ci}".strip())
        lines.append("| " + " | ".join([_md_escape(row["label"])] + cells) + " |")
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    """Every table of the report, each under a heading and followed by its notes."""
    parts = [f"# {report['title']}", ""]
    for table in report["tables"]:
        parts += [f"## {table['title']}", "", markdown_table(table), ""]
        for note in table.get("notes", []):
            parts.append(f"{note}  ")
        if table.get("notes"):
            parts.append("")
    robustness = report.get("robustness")
    if robustness:
        parts += [f"## {robustness['title']}", "", markdown_table(robustness), "", f"{robustness['caption']}", ""]
        parts += [f"{note}  " for note in robustness.get("notes", [])] + ([""] if robustness.get("notes") else [])
    for attack in report.get("attacks", []):
        parts.append(_attack_line(attack))
    return "\n".join(parts).rstrip() + "\n"


def _attack_line(attack: dict) -> str:
    before, after = attack.get("asr_before"), attack.get("asr_after")
    rates = (f": ASR {100 * before:.1f}% → {100 * after:.1f}%" if before is not None and after is not None else "")
    label = f" ({attack['label']})" if attack.get("label") else ""
    return f"- {attack['run_label']} on {attack['suite']}{label}{rates}"
