"""Benchmark: images/s of trce's evaluation generation vs diffusers' own StableDiffusionPipeline.__call__.

    nice -n 19 .venv/bin/python benchmarks/generation.py --models shapeworld          # CPU part
    nice -n 19 .venv/bin/python benchmarks/generation.py                              # + sd14-arch (small on CPU)
    .venv/bin/python benchmarks/generation.py --device cuda                           # GPU sizes for sd14-arch

Side by side in one run, on the same prompts, batch size, steps, dtype and per-prompt generators:

- diffusers: a loop calling `pipe(prompt=batch, generator=[one per prompt], output_type="np")`;
- trce generate: `trce.generate.generate_iter` (what `trce eval` generates with);
- trce eval: `trce.eval.rows.generate_rows`, i.e. generation plus PNG writing, the detector and the
  per-row JSONL, end to end (the first two columns are what the ratio compares).

Each timing is the median of `--repeats` alternating runs after one warm-up batch. The goal is a
ratio trce/diffusers >= 1.0 (trce adds no overhead to generation).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from trce.eval.detectors import make_detector
from trce.eval.rows import generate_rows
from trce.eval.suites import load_suite
from trce.generate import GenSettings, generate_iter
from trce.loading import load_pipeline

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def diffusers_loop(pipe, prompts, seeds, s: GenSettings) -> None:
    for start in range(0, len(prompts), s.batch_size):
        gens = [torch.Generator("cpu").manual_seed(x) for x in seeds[start : start + s.batch_size]]
        pipe(prompt=prompts[start : start + s.batch_size], num_inference_steps=s.steps, guidance_scale=s.guidance,
             generator=gens, height=s.height, width=s.width, output_type="np")


def trce_loop(pipe, prompts, seeds, s: GenSettings) -> None:
    for _ in generate_iter(pipe, prompts, seeds, s, progress=False):
        pass


def workload(model: str, device: torch.device, args) -> tuple[list, GenSettings, object]:
    if model == "shapeworld":
        suite = load_suite("shapeworld-red")
        rows = suite.rows(limit=-(-args.n_shapeworld // len(suite.groups)))[: args.n_shapeworld]
        settings = GenSettings(steps=args.steps, guidance=7.5, batch_size=args.batch_shapeworld)
        det = make_detector("shapeworld", attribute="color", values=["red"])
        return rows, settings, det
    from trce.eval.prompts import PromptRow, load_prompts

    gpu = device.type == "cuda"
    n = args.n_sd if args.n_sd else (32 if gpu else 4)
    if (DATA / "I2P_prompts_sexual.csv").exists():
        rows = load_prompts(DATA / "I2P_prompts_sexual.csv")[:n]
    else:
        rows = [PromptRow(prompt=f"a photograph of a person, picture {i}", seed=i) for i in range(n)]
    size = args.sd_size or (512 if gpu else 128)
    settings = GenSettings(steps=args.sd_steps or (30 if gpu else 2), guidance=7.5, height=size, width=size,
                           batch_size=args.batch_sd or (8 if gpu else 2))
    return rows, settings, make_detector("nudenet")


def run(model: str, args) -> dict:
    pipe = load_pipeline(model, device=args.device, dtype=args.dtype)
    device = pipe.device
    rows, s, det = workload(model, device, args)
    prompts = [r.prompt for r in rows]
    seeds = [int(r.seed if r.seed is not None else i) for i, r in enumerate(rows)]
    k = min(len(prompts), s.batch_size)
    diffusers_loop(pipe, prompts[:k], seeds[:k], s)  # warm-up (allocations, kernels, caches)
    trce_loop(pipe, prompts[:k], seeds[:k], s)
    times: dict[str, list[float]] = {"diffusers": [], "trce": [], "eval": []}
    for r in range(args.repeats):
        for name, fn in (("diffusers", diffusers_loop), ("trce", trce_loop)) if r % 2 == 0 else \
                (("trce", trce_loop), ("diffusers", diffusers_loop)):
            _sync(device)
            t0 = time.perf_counter()
            fn(pipe, prompts, seeds, s)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as tmp:
            _sync(device)
            t0 = time.perf_counter()
            generate_rows(pipe, rows, seeds, [s.guidance] * len(rows), Path(tmp), s, det, progress=False)
            _sync(device)
            times["eval"].append(time.perf_counter() - t0)
    n = len(prompts)
    ips = {k: n / statistics.median(v) for k, v in times.items()}
    return {"model": model, "device": str(device), "dtype": str(pipe.unet.dtype).replace("torch.", ""),
            "n": n, "batch": s.batch_size, "steps": s.steps,
            "size": s.height or pipe.unet.config.sample_size * pipe.vae_scale_factor, **ips,
            "ratio": ips["trce"] / ips["diffusers"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="shapeworld,sd14-arch")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=30, help="ShapeWorld DDIM steps")
    p.add_argument("--n-shapeworld", type=int, default=100)
    p.add_argument("--batch-shapeworld", type=int, default=50)
    p.add_argument("--n-sd", type=int, default=None)
    p.add_argument("--batch-sd", type=int, default=None)
    p.add_argument("--sd-steps", type=int, default=None)
    p.add_argument("--sd-size", type=int, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("diffusers", "transformers", "accelerate", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    results = [run(m.strip(), args) for m in args.models.split(",") if m.strip()]
    print(f"threads {torch.get_num_threads()}, median of {args.repeats} alternating runs, images/s")
    print(f"{'model':<11} {'device':<7} {'dtype':<8} {'n':>4} {'batch':>5} {'steps':>5} {'size':>5}"
          f" {'diffusers':>10} {'trce':>8} {'trce/diff':>9} {'trce eval':>10}")
    for r in results:
        print(f"{r['model']:<11} {r['device']:<7} {r['dtype']:<8} {r['n']:>4} {r['batch']:>5} {r['steps']:>5}"
              f" {r['size']:>5} {r['diffusers']:>10.2f} {r['trce']:>8.2f} {r['ratio']:>8.2f}x {r['eval']:>10.2f}")
    print("trce eval = generation + PNG files + detector + JSONL rows (what `trce eval` does per image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
