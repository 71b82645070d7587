"""`render_html`: the report as one self-contained HTML page.

Everything is inline: the stylesheet (templates/report.css), the plot and every image as a base64
PNG data URI. There is no script and no external URL, so the file can be mailed or archived
alone. Small renders (ShapeWorld's 32x32) are upscaled with nearest-neighbour so their pixels stay
sharp; real-suite images are shrunk to thumbnails, and those the detector judged unsafe are blurred
(strong Gaussian) unless the report's options say otherwise (`trce report --no-blur`).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from importlib import resources

from trce.report.outputs import GENERATOR
from trce.report.plot import asr_preservation_plot
from trce.report.tables import fmt_ci, fmt_value, render_markdown

log = logging.getLogger(__name__)

SMALL = 128  # images smaller than this (ShapeWorld) are upscaled to at least this size, nearest-neighbour
THUMB = 224  # real-suite images are shrunk to fit this square


def encode_image(path: str, *, blur: bool = False, small: int = SMALL, thumb: int = THUMB) -> str:
    """A data URI of the image at `path`: upscaled if small, thumbnailed if large, blurred when asked."""
    from PIL import Image, ImageFilter

    with Image.open(path) as im:
        img = im.convert("RGB")
    w, h = img.size
    if max(w, h) < small:
        s = math.ceil(small / max(w, h))
        img = img.resize((w * s, h * s), Image.Resampling.NEAREST)
    elif max(w, h) > thumb:
        img.thumbnail((thumb, thumb), Image.Resampling.LANCZOS)
    if blur:
        # Strong enough that nothing but the colour layout survives (sigma = 1/6 of the side).
        img = img.filter(ImageFilter.GaussianBlur(radius=max(8.0, max(img.size) / 6)))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _e(text) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _css() -> str:
    return resources.files("trce.report").joinpath("templates", "report.css").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- sections
def _header(report: dict, blur: bool) -> str:
    h = report["header"]
    suites = "".join(
        f"<div><b>{_e(s['name'])}</b> v{_e(s['version'])} · {_e(s['kind'])}"
        + (f" <span class='desc'>— {_e(s['description'])}</span>" if s.get("description") else "")
        + (f" <i>({_e(s['note'])})</i>" if s.get("note") else "") + "</div>"
        for s in h["suites"])
    dates = h["dates"]
    when = _e(dates[0]) if len(dates) == 1 else f"{_e(dates[0])} … {_e(dates[-1])}" if dates else "–"
    versions = " · ".join(f"{_e(k)} {_e(' / '.join(map(str, v)))}" for k, v in h["versions"].items()
                          if k != "platform")
    platform = h["versions"].get("platform")
    git = ", ".join(f"<code>{_e(g[:12])}</code>" for g in h["git_hashes"]) or "–"
    rows = [("Suites", suites), ("Models", ", ".join(f"<code>{_e(m)}</code>" for m in h["models"]) or "–"),
            ("Runs", f"{len(report['runs'])} · evaluated {when}"), ("Git", git), ("Versions", versions or "–")]
    bases = h.get("bases") or []
    if len(bases) > 1:  # rows of different base models never compete: say which bases there are
        rows.insert(2, ("Base models", ", ".join(
            f"<code>{_e(b['label'])}</code>" + (f" <span class='desc'>({_e(b['fingerprint'][:12])})</span>"
                                               if b.get("fingerprint") else "") for b in bases)))
    if platform:
        rows.append(("Platform", _e(" / ".join(map(str, platform)))))
    meta = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in rows)
    toc = ["<a href='#results'>Results</a>"]
    if report["plot"]["panels"]:
        toc.append("<a href='#plot'>ASR vs preservation</a>")
    if report.get("robustness"):
        toc.append("<a href='#robustness'>Robustness</a>")
    if report["attacks"]:
        toc.append("<a href='#attacks'>Attacks</a>")
    if report["grids"]:
        toc.append("<a href='#grids'>Before / after</a>")
    toc += ["<a href='#runs'>Runs</a>", "<a href='#markdown'>Markdown</a>"]
    has_real = any(g["kind"] == "real" for g in report["grids"])
    notice = ""
    if has_real:
        notice = ("<p class='notice'>Real-suite images the detector judged unsafe are <b>blurred</b> "
                  "(rerun with <code>--no-blur</code> to see them).</p>" if blur else
                  "<p class='notice off'>Blurring is <b>off</b> (<code>--no-blur</code>): images the detector judged "
                  "unsafe are shown as generated.</p>")
    return (f"<header><h1>{_e(report['title'])}</h1>"
            f"<p class='subtitle'>Concept-erasure evaluation · trce {_e(report['trce_version'])} · "
            f"report made {_e(report['created'])}</p><dl class='meta'>{meta}</dl>"
            f"<nav class='toc'>{''.join(toc)}</nav>{notice}</header>")


def _table(table: dict) -> str:
    cols = table["columns"]
    groups: list[tuple[str, int]] = []
    for c in cols:
        if groups and groups[-1][0] == c["group"]:
            groups[-1] = (c["group"], groups[-1][1] + 1)
        else:
            groups.append((c["group"], 1))
    firsts = set()
    k = 0
    for _, span in groups:
        firsts.add(k)
        k += span
    head1 = "<th class='method' rowspan='2'>Method</th>" + "".join(
        f"<th class='span' colspan='{span}'>{_e(g)}</th>" for g, span in groups)
    head2 = "".join(f"<th class='{'first-of-group' if i in firsts else ''}'>{_e(c['label'])}</th>"
                    for i, c in enumerate(cols))
    body = []
    for row in table["rows"]:
        tds = []
        for i, c in enumerate(cols):
            cell = row["cells"].get(c["key"])
            cls = ["num"] + (["best"] if cell and cell.get("best") else []) + (["first-of-group"] if i in firsts else [])
            ci = fmt_ci(cell, c["kind"])
            src = f" title='from {_e(cell['run'])}'" if cell and cell.get("run") else ""
            tds.append(f"<td class='{' '.join(cls)}'{src}><span class='v'>{_e(fmt_value(cell, c['kind']))}</span>"
                       + (f"<span class='ci'>{_e(ci)}</span>" if ci else "") + "</td>")
        body.append(f"<tr class='{'original' if row['original'] else 'patched'}'>"
                    f"<td class='method'>{_e(row['label'])}</td>{''.join(tds)}</tr>")
    notes = "".join(f"<li>{_e(n)}</li>" for n in table.get("notes", []))
    return (f"<h3 id='{_e(table['id'])}'>{_e(table['title'])}</h3><div class='table-wrap'><table class='results'>"
            f"<thead><tr class='groups'>{head1}</tr><tr>{head2}</tr></thead><tbody>{''.join(body)}</tbody>"
            f"</table></div><p class='caption'>{_e(table['caption'])}</p>"
            + (f"<ul class='notes'>{notes}</ul>" if notes else ""))


def _plot(report: dict, png: bytes | None) -> str:
    if not report["plot"]["panels"]:
        return ""
    png = png if png is not None else asr_preservation_plot(report)
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    caption = ("One point per table row; the vertical bars are 95% Wilson intervals of the ASR. "
               "ShapeWorld: y is the ASR pooled over every erasure group (keyword, synonym, paraphrase and their "
               "held-out-template -open groups); x is preservation — "
               "1 minus the drop in the detector's accuracy on preserve, unrelated and preserve-open prompts relative "
               "to the "
               "original model (1 = nothing lost), and the Fréchet distance of image features to the original "
               "model on the same prompts and seeds (0 = identical). Real suites: y is the ASR on I2P (open markers: "
               "the mean over the adversarial suites), x the FID to the original model on COCO prompts (or the CLIP "
               "score when no FID was measured). The ideal erasure sits at the bottom, on the side marked 'better'.")
    return (f"<section id='plot'><h2>ASR vs preservation</h2><figure class='plot'>"
            f"<img src='{uri}' alt='ASR versus preservation, one point per run'>"
            f"<figcaption>{_e(caption)}</figcaption></figure></section>")


def _attacks(report: dict) -> str:
    if not report["attacks"]:
        return ""
    from trce.report.runs import attack_display

    rows = []
    for a in report["attacks"]:
        before, after = a.get("asr_before"), a.get("asr_after")
        rows.append(f"<tr><td>{_e(a['run_label'])}</td><td>{_e(a['suite'])}</td><td>{_e(attack_display(a) if a.get('name') else None)}</td>"
                    f"<td>{_e(a.get('label') or '–')}</td>"
                    f"<td>{'–' if before is None else f'{100 * before:.1f}%'}</td>"
                    f"<td>{'–' if after is None else f'{100 * after:.1f}%'}</td></tr>")
    caption = ("ASR before and after each red-team attack. An attack labelled “knowledge left” (e.g. a learned soft "
               "prompt) optimises an embedding no user can type: a high rate shows the concept is still in the "
               "weights, not that a typed prompt brings it back.")
    return (f"<section id='attacks'><h2>Attacks</h2><div class='table-wrap'><table class='runs'><thead><tr>"
            "<th>Run</th><th>Suite</th><th>Attack</th><th>Label</th><th>ASR before</th><th>ASR after</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div><p class='caption'>{_e(caption)}</p></section>")


def _robustness(report: dict) -> str:
    table = report.get("robustness")
    if not table:
        return ""
    return f"<section id='robustness'><h2>Robustness</h2>{_table(table)}</section>"


def _badge(entry: dict, kind: str, attribute: str | None, blurred: bool) -> str:
    if kind == "shapeworld":
        if entry.get("detected") is None:
            return ""
        cls = "badge hit" if entry.get("erased_value") else "badge"
        return f"<span class='{cls}' title='detector top-1 {_e(attribute)}'>{_e(entry['detected'])}</span>"
    v = entry.get("verdict")
    if v is None:
        return ""
    text = "unsafe" + (" · blurred" if blurred else "") if v else "safe"
    title = f" title='{_e(entry['detected'])}'" if entry.get("detected") else ""
    return f"<span class='badge{' hit' if v else ''}'{title}>{_e(text)}</span>"


def _image_cell(entry: dict | None, role: str, grid: dict, item: dict, blur: bool, cache: dict) -> str:
    label = "original" if role == "before" else ("this run" if grid["original"] else "erased")
    if entry is None or entry.get("image") is None:
        why = "no reference image" if entry is None else "image file missing"
        return f"<div class='cell'><span class='role'>{label}</span><div class='missing'>{why}</div></div>"
    blurred = bool(blur and entry.get("unsafe"))
    key = (entry["image"], blurred)
    if key not in cache:
        cache[key] = encode_image(entry["image"], blur=blurred)
    alt = f"{label}: {item.get('prompt')}"
    return (f"<div class='cell'><span class='role'>{label}</span>"
            f"<img src='{cache[key]}' alt='{_e(alt)}' data-run='{_e(grid['run'])}' data-index='{_e(item['index'])}' "
            f"data-role='{role}' data-unsafe='{int(bool(entry.get('unsafe')))}' data-blurred='{int(blurred)}'>"
            f"{_badge(entry, grid['kind'], grid.get('attribute'), blurred)}</div>")


def _grids(report: dict, blur: bool) -> str:
    if not report["grids"]:
        return ""
    cache: dict = {}
    parts = ["<section id='grids'><h2>Before / after</h2>"]
    n = report["options"]["grid_size"]
    parts.append(f"<p class='caption'>For each evaluated run, up to {n} prompts per group, evenly spaced over the "
                 "group's rows (the same picks in every run): the original model's image (left) and the run's image "
                 "(right) on the same prompt and seed. ShapeWorld renders are upscaled without smoothing; the badge is "
                 "the detector's top-1 value of the erased attribute, red when it is an erased value. Real suites: the "
                 "badge is the detector's verdict.</p>")
    for grid in report["grids"]:
        where = f"reference: {grid['reference']}" if grid.get("reference") else (
            "the original model's own images" if grid["original"] else
            "no reference images (evaluate with a reference, or add the original model's run)")
        parts.append(f"<div class='grid-head'><h3>{_e(grid['label'])} — {_e(grid['suite'])}</h3>"
                     f"<span class='where'>{_e(where)}</span></div>")
        for group in grid["groups"]:
            parts.append(f"<h4>{_e(group['name'])} <span class='count'>({len(group['items'])} of "
                         f"{group['total']})</span></h4><div class='pairs'>")
            for item in group["items"]:
                paired = not grid["original"] and grid.get("reference")
                cells = _image_cell(item["before"], "before", grid, item, blur, cache) if paired else ""
                cells += _image_cell(item["after"], "after", grid, item, blur, cache)
                seed = f"seed {item['seed']}" + (f" · guidance {item['guidance']}" if item.get("guidance") else "")
                parts.append(f"<figure class='pair {_e(grid['kind'])}'><div class='imgs'>{cells}</div>"
                             f"<figcaption>{_e(item['prompt'])}<br><span class='seed'>{_e(seed)}</span>"
                             "</figcaption></figure>")
            parts.append("</div>")
    parts.append("</section>")
    return "".join(parts)


def _fmt_setting(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def _runs(report: dict) -> str:
    rows = []
    for r in report["runs"]:
        s = r["settings"]
        asr = "–" if r["asr"] is None else f"{100 * r['asr']:.1f}%"
        det = r["detector"].get("name") or "–"
        if r["detector"].get("threshold") is not None:
            det += f" ({r['detector']['threshold']})"
        guidance = _fmt_setting(s.get("guidance")) + (" / per prompt" if s.get("per_prompt_guidance") else "")
        rows.append(
            f"<tr><td>{_e(r['label'])}</td><td>{_e(r['suite'])}</td><td class='mono' title='{_e(r['folder'])}'>"
            f"{_e(r['name'])}</td><td>{_e(r['patch'] or '–')}</td><td>{_e(r['n'])}</td><td>{asr}</td>"
            f"<td>{_e(_fmt_setting(s.get('steps')))}</td><td>{_e(guidance)}</td><td>{_e(_fmt_setting(s.get('size')))}</td>"
            f"<td>{_e(_fmt_setting(s.get('seeds')))}</td><td>{_e(det)}</td><td>{_e(r['date'] or '–')}</td>"
            f"<td class='mono'>{_e((r['git_hash'] or '–')[:12])}</td></tr>")
        for note in r.get("notes", []):
            rows.append(f"<tr><td></td><td colspan='12' class='caption'>{_e(note)}</td></tr>")
    return ("<section id='runs'><h2>Runs</h2><div class='table-wrap'><table class='runs'><thead><tr><th>Row</th>"
            "<th>Suite</th><th>Folder</th><th>Patch</th><th>n</th><th>ASR</th><th>Steps</th><th>Guidance</th>"
            "<th>Size</th><th>Seed offsets</th><th>Detector</th><th>Date</th><th>Git</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div><p class='caption'>Every run folder in this report with the "
            "settings its images were made with (from its metrics.json).</p></section>")


def render_html(report: dict, *, blur: bool | None = None, plot_png: bytes | None = None) -> str:
    """The whole page. `blur` overrides the report's option; `plot_png` reuses an already drawn plot."""
    blur = report["options"].get("blur", True) if blur is None else bool(blur)
    tables = "".join(_table(t) for t in report["tables"])
    markdown = render_markdown(report)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<meta name='generator' content='{GENERATOR}'>"
        f"<title>{_e(report['title'])}</title><style>{_css()}</style></head><body><main>"
        f"{_header(report, blur)}"
        f"<section id='results'><h2>Results</h2>{tables}</section>"
        f"{_plot(report, plot_png)}{_robustness(report)}{_attacks(report)}{_grids(report, blur)}{_runs(report)}"
        "<section id='markdown'><h2>Markdown</h2><details><summary>The tables above as Markdown</summary>"
        f"<pre class='markdown'>{_e(markdown)}</pre></details></section>"
        f"<footer>Made by trce {_e(report['trce_version'])} from {len(report['runs'])} run folder(s); the numbers "
        "come from each run's metrics.json, the images from its images/ and reference/ folders.</footer>"
        "</main></body></html>\n"
    )
