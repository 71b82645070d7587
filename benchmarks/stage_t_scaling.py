"""Benchmark: TRCE stage T erasing 1, 10, 100 and 1,000 concepts in ONE closed-form solve (MACE erases 100, ETC
2,072), time and peak memory per count, with the preservation prior already cached.

    nice -n 19 .venv/bin/python benchmarks/stage_t_scaling.py --models sd14-arch,sdxl-arch
    .venv/bin/python benchmarks/stage_t_scaling.py --models shapeworld --counts 1,10,100   # a quick look

Concepts are words of the model's tokenizer vocabulary (whole-word tokens, then two-word names when there are too
few; ShapeWorld's BPE stands in for CLIP's on the random-weight architectures), each erased in two templates ("a photo of {}", "{}, oil
painting") and mapped to the template without it, as a multi-concept spec would. The prior is computed once on
the preservation prompts (COCO captions when --data holds them, else ShapeWorld captions) and cached: the timed
runs are the warm ones, what a user erasing another batch of concepts from the same base model pays. Columns:
concepts, embedding rows mapped, seconds encoding the prompts, seconds of the solve and the layer products,
total seconds, peak RSS growth in MB. The solve is one D x D system whatever the count; the encoding grows with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from stage_t import _peak_mb, _reset_peak, _rss_mb

from trce.attacks.vocabulary import real_tokens
from trce.concepts import Expression, Preservation, load_spec
from trce.families import family_of
from trce.loading import load_pipeline
from trce.methods.stage_t import StageTConfig, erase
from trce.registry import Context

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TEMPLATES = ("a photo of {}", "{}, oil painting")


def concepts(pipe, n: int):
    """n concept specs: the tokenizer's whole-word tokens (alphabetic, 4+ letters), then pairs of them."""
    words = sorted({w for w in real_tokens(family_of(pipe).tokenizer(pipe)).values() if w.isalpha() and len(w) >= 4})
    if len(words) < n:
        # ShapeWorld's BPE (the random-weight architectures' tokenizer) has a few hundred whole words: the rest are
        # two-word concepts ("amber circle"), as multi-word names (artists, objects) are in real concept lists
        words += [f"{a} {b}" for a in words for b in words if a != b][: n - len(words)]
    base = load_spec("church")  # any text spec: its settings (eta, ridge, role) are the defaults of real specs
    return [dataclasses.replace(base, name=f"w{i}-{w}", aliases=(), settings={},
                                expressions=(Expression(text=w, target=""),), templates=TEMPLATES,
                                preservation=Preservation("none"))
            for i, w in enumerate(words[:n])]


def run(model: str, counts: list[int], data: Path | None, prior_prompts: int) -> list[dict]:
    pipe = load_pipeline(model, device="cpu")
    prompts_spec = load_spec("sexual" if data is not None else "shapeworld-red")
    preserve = dataclasses.replace(prompts_spec.preservation, n=prior_prompts)
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        ctx = Context(cache_dir=cache, data_dir=str(data) if data else None, progress=False)
        # the prior once (cold): every later solve reads it from the cache
        warmup = concepts(pipe, 1)
        warmup = [dataclasses.replace(warmup[0], preservation=preserve)]
        erase(pipe, warmup, StageTConfig(), ctx)
        for n in counts:
            specs = [dataclasses.replace(s, preservation=preserve) for s in concepts(pipe, n)]
            _reset_peak()
            before = _rss_mb()
            t0 = time.perf_counter()
            edit = erase(pipe, specs, StageTConfig(), ctx)
            total = time.perf_counter() - t0
            sec = edit.info["seconds"]
            rows.append({"model": model, "concepts": n, "embeddings": edit.info["embeddings"],
                         "encode_s": round(sec["encode"], 2), "solve_s": round(sec["solve"], 2),
                         "total_s": round(total, 2), "peak_mb": round(_peak_mb() - before, 1),
                         "prior_cached": edit.info["prior_cached"]})
            print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd14-arch,sdxl-arch")
    p.add_argument("--counts", default="1,10,100,1000")
    p.add_argument("--data", default=str(DATA) if (DATA / "prompts" / "coco_30k.csv").exists() else None)
    p.add_argument("--prior-prompts", type=int, default=200)
    args = p.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    rows = []
    for model in args.models.split(","):
        rows += run(model.strip(), counts, Path(args.data) if args.data else None, args.prior_prompts)
    print("\n| model | concepts | embeddings | encode s | solve s | total s | peak MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['concepts']} | {r['embeddings']} | {r['encode_s']} | {r['solve_s']} | "
              f"{r['total_s']} | {r['peak_mb']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
