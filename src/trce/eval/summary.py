"""`Metrics` (metrics.json as a dict) and the text tables `trce eval` prints; `trce attack` shares the rate and
interval formatting."""

from __future__ import annotations

from pathlib import Path


class Metrics(dict):
    """`metrics.json` as a dict, with the table `trce eval` prints (`.table()`) and where it was written (`.path`)."""

    path: Path | None = None

    @property
    def asr(self) -> float | None:
        return self.get("asr")

    def table(self) -> str:
        return format_table(self)


def format_rate(x) -> str:
    """A fraction as a right-aligned percentage for the printed tables ("-" for None)."""
    return "   -  " if x is None else f"{100 * x:5.1f}%"


def format_ci(ci) -> str:
    """A 95% interval as "[lo, hi]" in percent, or "" without one."""
    return "" if ci is None else f"[{100 * ci[0]:4.1f}, {100 * ci[1]:5.1f}]"


def format_table(m: dict) -> str:
    """The per-group (ShapeWorld) or per-category (real suites) table `trce eval` prints."""
    s = m["settings"]
    head = (f"{m['suite']} v{m['suite_version']}  model {m['model']}  patch {m['patch'] or '-'}"
            f"{'  (' + m['method'] + (' + hidden prompt' if m.get('hidden_prompt') else '') + ')' if m.get('method') else ''}\n"
            f"{m['n']} images, {s['steps']} steps, "
            f"guidance {'per prompt, else ' if s.get('per_prompt_guidance') else ''}{s['guidance']}, size {s['size']}"
            f", seed offsets {','.join(map(str, s['seeds']))}, detector {m['detector']['name']}"
            + (f" (threshold {m['detector']['threshold']})" if m['detector'].get('threshold') is not None else ""))
    lines = [head]
    if m.get("note"):
        lines.append(f"note: {m['note']}")
    if m["kind"] == "shapeworld":
        from trce.shapeworld import world

        ref = m.get("reference") or {}
        lines.append(f"{'group':<15} {'n':>5}  {'rate':>6} {'95% CI':<14}" + ("  orig. " if ref else "")
                     + "".join(f" {a[:7]:>7}" for a in world.ATTRIBUTES) + "   clip       fd")
        for g, row in m["groups"].items():
            orig = ref.get("groups", {}).get(g, {}).get("asr") if ref else None
            acc = "".join(f" {format_rate(row['accuracy'].get(a)) if a in row['accuracy'] else '    - ':>7}"
                          for a in world.ATTRIBUTES)
            clip = f"{row['clip_score']:6.1f}" if row.get("clip_score") is not None else "    - "
            fd = f"{row['fd']:8.3g}" if row.get("fd") is not None else "      - "
            lines.append(f"{g:<15} {row['n']:>5}  {format_rate(row['asr'])} {format_ci(row['asr_ci']):<14}"
                         + (f"  {format_rate(orig)}" if ref else "") + acc + f"  {clip} {fd}")
        lines.append("rate = images the detector classifies as the erased value; accuracy = detector agrees with "
                     "the prompt on the attributes it names")
    else:
        lines.append(f"{'category':<20} {'n':>5}  {'ASR':>6} {'95% CI':<14}")
        for c, row in m["by_category"].items():
            lines.append(f"{c[:20]:<20} {row['n']:>5}  {format_rate(row['asr'])} {format_ci(row['asr_ci'])}")
    lines.append(f"{'all' if m['kind'] == 'real' else 'erasure groups':<20} "
                 f"{'':>5}  {format_rate(m['asr'])} {format_ci(m['asr_ci'])}"
                 + (f"   mean over seeds {format_rate(m['asr_mean'])} ± {100 * m['asr_std']:.1f}" if "asr_mean" in m else ""))
    extras = []
    if m.get("esr") is not None:
        extras.append(f"ESR {format_rate(m['esr'])} {format_ci(m['esr_ci'])}  PSR {format_rate(m['psr'])} {format_ci(m['psr_ci'])}")
    extras.append(f"{'FID' if m['kind'] == 'real' else 'fd'} {m['fd']:.4g}" if m.get("fd") is not None
                  else ("fd - (no patch)" if m["kind"] == "shapeworld" else m.get("fid_note") or ""))
    extras.append(f"CLIP score {m['clip_score']:.2f}" if m.get("clip_score") is not None
                  else m.get("clip_score_note", ""))
    lines.append("   ".join(e for e in extras if e))
    return "\n".join(lines)
