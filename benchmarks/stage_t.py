"""Benchmark: time and peak memory of TRCE stage T (and its [KEY] ablation, `trce-key`) per concept.

    nice -n 19 .venv/bin/python benchmarks/stage_t.py                    # sd14-arch and shapeworld
    .venv/bin/python benchmarks/stage_t.py --models sdxl-arch --concepts sexual   # ~19 GB of RAM, ~15 min
    .venv/bin/python benchmarks/stage_t.py --models shapeworld --device cuda

For every (model, concept): one *cold* TRCE run (empty prior cache: the preservation prior is
encoded and accumulated) and then *warm* TRCE and TRCE [KEY] runs (prior read from the cache, the usual
case: one prior serves every concept of a base model). Columns: embedding rows mapped,
preservation prompts, seconds of the prior (cold), total cold seconds and peak memory growth,
then for the warm run the seconds encoding the pairs, of the solve + layer products, the total
and its peak memory growth (CPU: peak RSS, reset through /proc/self/clear_refs where Linux allows
it; GPU: torch.cuda.max_memory_allocated).
`sd14-arch` has SD v1.4's shapes with random weights (timing does not depend on values); its
tokenizer is ShapeWorld's BPE padded to 77 tokens, so real-text prompts split into more pieces
than with CLIP's vocabulary; roles that skip the padding (eot, key) encode only up to the
batch's longest prompt, so they cost more here than with the real tokenizer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from trce.concepts import load_spec
from trce.families import family_of
from trce.loading import load_pipeline
from trce.methods.stage_t import StageTConfig, erase, erase_trce_key
from trce.registry import Context

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CONCEPTS = {"sd14-arch": ("sexual", "church"), "sd2-arch": ("sexual", "church"),
            "shapeworld": ("shapeworld-red", "shapeworld-3shapes")}


def _rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) on Linux >= 4.0
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(fn, args: tuple, device: torch.device) -> tuple[object, float, float]:
    """(result, seconds, peak memory growth in MB) of fn(*args)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start_mem = torch.cuda.memory_allocated()
    else:
        _reset_peak()
        start_mem = _rss_mb()
    t0 = time.perf_counter()
    result = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - start_mem) / 2**20
    else:
        peak = _peak_mb() - start_mem
    return result, time.perf_counter() - t0, peak


def run(models, concepts_for, prior_prompts: int, device: str | None, data: Path | None) -> list[dict]:
    rows = []
    for model in models:
        t0 = time.perf_counter()
        pipe = load_pipeline(model, device=device)
        load_s = time.perf_counter() - t0
        dev = pipe.device
        print(f"# {model}: loaded in {load_s:.1f} s on {dev} ({family_of(pipe).denoiser(pipe).dtype}), "
              f"text width {family_of(pipe).text_width(pipe)}, {pipe.tokenizer.model_max_length} tokens",
              flush=True)
        for concept in concepts_for.get(model, CONCEPTS["sd14-arch"]):
            spec = load_spec(concept)
            if spec.preservation.source in ("coco", "shapeworld-captions", "file", "prompts"):
                spec = dataclasses.replace(spec, preservation=dataclasses.replace(spec.preservation, n=prior_prompts))
            with tempfile.TemporaryDirectory() as cache:
                config = StageTConfig()
                context = Context(cache_dir=cache, data_dir=str(data) if data else None, progress=False)
                cold, cold_s, cold_mb = measure(erase, (pipe, spec, config, context), dev)
                for method, fn in (("trce", erase), ("trce-key", erase_trce_key)):
                    warm, warm_s, warm_mb = measure(fn, (pipe, spec, config, context), dev)
                    sec = warm.info["seconds"]
                    rows.append({
                        "model": model, "concept": concept, "method": method, "embeddings": warm.info["embeddings"],
                        "prior_prompts": warm.info["preserve_prompts"], "prior_s": cold.info["seconds"]["prior"],
                        "cold_s": cold_s if method == "trce" else float("nan"),
                        "cold_peak_mb": cold_mb if method == "trce" else float("nan"),
                        "encode_s": sec["encode"], "solve_s": sec["solve"], "warm_s": warm_s, "warm_peak_mb": warm_mb,
                        "tensors": warm.info["tensors"], "device": str(dev), "warm_cached": warm.info["prior_cached"],
                    })
                    print(_format([rows[-1]], header=len(rows) == 1), flush=True)
    return rows


def _format(rows: list[dict], header: bool = True) -> str:
    cols = ("model", "concept", "method", "embeddings", "prior_prompts", "prior_s", "cold_s", "cold_peak_mb",
            "encode_s", "solve_s", "warm_s", "warm_peak_mb")
    widths = {c: max(len(c), 10) for c in cols}
    widths["concept"] = 18
    lines = [" ".join(f"{c:>{widths[c]}}" for c in cols)] if header else []
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            cells.append(f"{v:>{widths[c]}.2f}" if isinstance(v, float) else f"{v!s:>{widths[c]}}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd14-arch,shapeworld")
    p.add_argument("--prior-prompts", type=int, default=200,
                   help="preservation prompts per concept (the built-ins use 1000; the prior is cached once per model)")
    p.add_argument("--device", default=None)
    p.add_argument("--data", default=str(DATA) if DATA.exists() else None, help="shared data folder (COCO captions)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--concepts", default=None,
                   help="comma-separated concept specs for every model (default: sexual,church; shapeworld-red,"
                        "shapeworld-3shapes on ShapeWorld)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    concepts = CONCEPTS
    if args.concepts:
        chosen = tuple(c.strip() for c in args.concepts.split(",") if c.strip())
        concepts = {m: chosen for m in models}
    rows = run(models, concepts, args.prior_prompts, args.device, Path(args.data) if args.data else None)
    print("\n" + _format(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
