"""KPOP against UCE, TRCE and ESD on ShapeWorld, erasing three shapes at once (`shapeworld-3shapes`, the analogue of
the paper's Imagenette table), with the hidden prompt's recovery grid (paper Fig. 6).

    python benchmarks/kpop_shapeworld.py --out runs/kpop-3shapes                  # ~10 min on 2 CPU cores
    python benchmarks/kpop_shapeworld.py --out /tmp/k --limit 10 --iterations 20  # a smoke run
    python benchmarks/kpop_shapeworld.py --model shapeworld-dit --out runs/3shapes-dit --rows "original,trce T+V,kpop"
    python benchmarks/kpop_shapeworld.py --out runs/red --grid-patch runs/red-kpop \
        --grid-prompts "a red star on a black background" "a red square on a grey background"  # a grid only

Every row goes through the CLI a user would type (`trce erase`, then `trce eval` on the suite with `--limit`
prompts per group, all rows sharing one cache of the original model's images), so the table is what
`metrics.json` says. Rows:

- original: no patch;
- uce, trce T, trce T+V: the spec's settings;
- esd-x, esd-u: ESD on cross-attention / on everything else, the spec's `esd:` settings;
- kpop (Eq. 7): the spec's KPOP settings with `negative_guidance=0 negative_others=0 preserve_weight=0`, the removal
  loss exactly as the paper writes it;
- kpop (own shape): ESD's negatively guided target away from the prompt's own shape only, and the preservation term
  ("Ours*", weight 0.5);
- kpop: the spec's KPOP settings (the target also moves away from the two other erased shapes, `negative_others`).

`results.json` is rewritten after each row, so an interrupted run goes on from the next row. The Markdown table
(`table.md`) gives ESR / PSR with 95% Wilson CIs, the share of erased-shape prompts drawn as *any* of the
erased shapes (ESR only counts the prompted one), the preserved prompts' colour and pattern accuracy, FD
against the original model's images and the CLIP score. `recovery.png` shows, one row per prompt, the original
model, the KPOP-erased model and the erased model with its hidden prompt on the same seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from trce.cli import main as trce
from trce.utils import io

CONCEPT = "shapeworld-3shapes"
ROWS = {  # label -> `trce erase` arguments (None: the original model)
    "original": None,
    "uce": ["--method", "uce"],
    "trce T": ["--method", "trce", "--stages", "T"],
    "trce T+V": ["--method", "trce", "--stages", "T,V"],
    "esd-x": ["--method", "esd"],
    "esd-u": ["--method", "esd", "--set", "esd.params=non-cross-attn"],
    "kpop (Eq. 7)": ["--method", "kpop", "--set", "kpop.negative_guidance=0", "--set", "kpop.negative_others=0",
                     "--set", "kpop.preserve_weight=0"],
    "kpop (own shape)": ["--method", "kpop", "--set", "kpop.negative_others=0", "--set", "kpop.preserve_weight=0.5"],
    "kpop": ["--method", "kpop"],
}
GRID_PROMPTS = ("a red circle on a black background", "a blue star on a white background",
                "a green triangle on a grey background", "a yellow square on a black background")


def _run(*args: str) -> None:
    code = trce([str(a) for a in args])
    if code != 0:
        raise SystemExit(f"trce {' '.join(map(str, args))} exited with {code}")


def row(out: Path, label: str, erase_args: list[str] | None, limit: int, steps: int, iterations: int | None,
        model: str = "shapeworld") -> dict:
    slug = label.replace(" ", "-").replace("(", "").replace(")", "").replace(".", "").replace("+", "")
    patch = out / "patches" / slug
    seconds = None
    if erase_args is not None:
        t0 = time.time()
        method = erase_args[erase_args.index("--method") + 1]
        extra = ["--set", f"{method}.iterations={iterations}"] if iterations and method in ("kpop", "esd") else []
        if not (patch / "patch.json").exists():
            _run("erase", "--model", model, "--concept", CONCEPT, *erase_args, *extra, "--out", patch)
        seconds = round(time.time() - t0, 1)
    run = out / "eval" / slug
    _run("eval", "--model", model, *(["--patch", patch] if erase_args is not None else []), "--suite", CONCEPT,
         "--limit", limit, "--steps", steps, "--reference-cache", out / "reference-cache", "--no-progress",
         "--out", run)
    m = io.read_json(run / "metrics.json")
    groups = m["groups"]
    erasure = [g for g in ("keyword", "synonym", "paraphrase") if g in groups]
    return {"label": label, "patch": str(patch) if erase_args is not None else None, "erase_seconds": seconds,
            "esr": m["esr"], "esr_ci": m["esr_ci"], "psr": m["psr"], "psr_ci": m["psr_ci"],
            "any_erased": float(np.mean([groups[g]["asr"] for g in erasure])),
            "preserve_color": groups["preserve"]["accuracy"]["color"],
            "preserve_pattern": groups["preserve"]["accuracy"]["pattern"],
            "fd": m["fd"], "clip_score": m["clip_score"], "n_per_group": groups["keyword"]["n"]}


def table(rows: list[dict]) -> str:
    def pct(x) -> str:
        return "–" if x is None else f"{100 * x:.1f}%"

    def ci(c) -> str:
        return "" if not c else f" [{100 * c[0]:.1f}, {100 * c[1]:.1f}]"

    header = ("| method | ESR | PSR | erased prompts drawn as any erased shape | preserve colour | preserve pattern "
              "| FD | CLIP-S | erase s |")
    lines = [header, "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        fd = "–" if r["fd"] is None else f"{r['fd']:.2f}"
        lines.append(f"| {r['label']} | {pct(r['esr'])}{ci(r['esr_ci'])} | {pct(r['psr'])}{ci(r['psr_ci'])} "
                     f"| {pct(r['any_erased'])} | {pct(r['preserve_color'])} | {pct(r['preserve_pattern'])} | {fd} "
                     f"| {r['clip_score']:.2f} | {r['erase_seconds'] if r['erase_seconds'] is not None else '–'} |")
    return "\n".join(lines) + "\n"


def recovery_grid(out: Path, patch: Path, n: int, seed: int, prompts=GRID_PROMPTS, model: str = "shapeworld") -> Path:
    """Rows: original | erased | erased + hidden prompt, for each of `prompts` (n seeds each)."""
    from PIL import Image, ImageDraw

    kinds = {"original": [], "erased": ["--patch", patch], "erased + hidden prompt": ["--patch", patch,
                                                                                       "--with-hidden-prompt"]}
    tiles, labels = [], []
    for prompt in prompts:
        for kind, extra in kinds.items():
            png = out / "recovery" / f"{len(tiles):02d}.png"
            _run("generate", "--model", model, *extra, "--prompt", prompt, "--n", n, "--seed", seed,
                 "--out", png)
            tiles.append(np.asarray(Image.open(png).convert("RGB")))
            labels.append(f"{prompt} | {kind}")
    width = max(t.shape[1] for t in tiles)
    rows = []
    for tile, label in zip(tiles, labels):
        strip = Image.new("RGB", (380, tile.shape[0]), "white")
        ImageDraw.Draw(strip).text((4, tile.shape[0] // 2 - 6), label, fill="black")
        tile = np.pad(tile, ((0, 0), (0, width - tile.shape[1]), (0, 0)), constant_values=255)
        rows.append(np.pad(np.concatenate([np.asarray(strip), tile], axis=1), ((0, 4), (0, 0), (0, 0)),
                           constant_values=255))
    target = out / "recovery.png"
    io.save_png(target, np.concatenate(rows))
    io.write_json(out / "recovery.json", {"rows": labels, "patch": str(patch), "seed": seed, "n": n})
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/kpop-3shapes"))
    p.add_argument("--model", default="shapeworld", help="shapeworld, shapeworld-xl or shapeworld-dit (the spec's "
                   "family_settings for its family apply)")
    p.add_argument("--limit", type=int, default=100, help="prompts per suite group (default 100: 500 images a row)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps of the evaluation images")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    p.add_argument("--iterations", type=int, default=None, help="KPOP and ESD iterations (default: the spec's)")
    p.add_argument("--grid-seeds", type=int, default=8, help="images per prompt in recovery.png (0: none)")
    p.add_argument("--grid-patch", type=Path, default=None,
                   help="only draw OUT/recovery.png for this KPOP patch (no table)")
    p.add_argument("--grid-prompts", nargs="+", default=list(GRID_PROMPTS), help="the recovery grid's prompts")
    args = p.parse_args(argv)
    if args.grid_patch is not None:
        grid = recovery_grid(args.out, args.grid_patch, args.grid_seeds, 0, args.grid_prompts, args.model)
        print(f"recovery grid: {grid}")
        return 0
    chosen = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in chosen if r not in ROWS]
    if unknown:
        p.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "results.json"
    done = {r["label"]: r for r in (io.read_json(results_file)["rows"] if results_file.exists() else [])}
    for label in chosen:
        if label not in done:
            done[label] = row(args.out, label, ROWS[label], args.limit, args.steps, args.iterations, args.model)
            io.write_json(results_file, {"concept": CONCEPT, "model": args.model, "limit": args.limit, "steps": args.steps,
                                         "rows": [done[k] for k in ROWS if k in done]})
    rows = [done[k] for k in ROWS if k in done and k in chosen]
    md = table(rows)
    io.write_text(args.out / "table.md", md)
    print(md)
    if args.grid_seeds > 0 and "kpop" in done and done["kpop"]["patch"]:
        grid = recovery_grid(args.out, Path(done["kpop"]["patch"]), args.grid_seeds, 0, args.grid_prompts, args.model)
        print(f"recovery grid: {grid}")
    print(json.dumps({"results": str(results_file)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
