"""Cost of one hardening round (`trce erase --robust R`) at SD v1.4 scale, on the CPU or the GPU if any.

    python benchmarks/robust.py                                   # sd14-arch (random weights), concept `sexual`
    python benchmarks/robust.py --model shapeworld --concept shapeworld-red
    python benchmarks/robust.py --model CompVis/stable-diffusion-v1-4 --device cuda --json runs/robust-gpu.json

A hardening round (`trce.methods.robust.harden`) is: closed-form adversaries in RECE's form (one D x D solve;
`--method rece` is RECE itself), the soft-
prompt attack against the current edited model on `robust_prompts` spec prompts (Adam steps of the denoising
objective through the text encoder and the UNet, `robust_samples` noisy latents each), and a re-solve of Eq. 5.
Round 1 also draws the original model's reference images of every prompt any round will attack (once per run).
Stage V's rounds (`V.robust`) run the same soft-prompt attack with the same budget against the model in training,
so the soft part of a round is also stage V's extra cost per round.

Stage T is hardened twice here at a small budget (plumbing: 1 prompt, 1 sample, 2 reference steps), with
`robust_steps` s and s + 2 and R = 2 rounds: round 2 (no reference images) gives the cost of a round, the
difference between the two runs the cost of one attack step, and round 1 minus round 2 the reference images.
From these the cost of a round at the defaults (16 prompts x 30 steps x 4 samples, 20 reference steps) is
extrapolated, linear in prompts x steps x samples (a planning number, not a measurement; on random weights the
cost does not depend on the values). The plain stage T (R = 0) runs beside it, prior cached, for the ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from trce.concepts import load_spec
from trce.loading import load_pipeline
from trce.methods.robust import pick_pairs
from trce.methods.stage_t import StageTConfig, erase
from trce.registry import Context

SMALL = {"robust_prompts": 1, "robust_samples": 1, "robust_reference_steps": 2, "robust_tokens": 5}


def hardened(pipe, spec, context, rounds: int, steps: int, attack: str):
    """One stage T run with R rounds at the small budget; returns (wall seconds, the rounds' records)."""
    config = StageTConfig(robust=rounds, robust_steps=steps, robust_attack=attack, **SMALL) if rounds else StageTConfig()
    t0 = time.perf_counter()
    edit = erase(pipe, spec, config, context)
    return time.perf_counter() - t0, (edit.info.get("robust") or {}).get("rounds", [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd14-arch")
    ap.add_argument("--concept", default="sexual")
    ap.add_argument("--device", default=None)
    ap.add_argument("--steps", type=int, default=2, help="robust_steps of the first hardened run (the second: +2)")
    ap.add_argument("--prior-prompts", type=int, default=200, help="preservation prompts (the prior is cached once)")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    t0 = time.perf_counter()
    pipe = load_pipeline(args.model, device=args.device)
    load_s = time.perf_counter() - t0
    spec = load_spec(args.concept)
    if spec.preservation.source in ("coco", "shapeworld-captions", "file", "prompts"):
        spec = dataclasses.replace(spec, preservation=dataclasses.replace(spec.preservation, n=args.prior_prompts))
    device = str(pipe.device) + (f" ({torch.cuda.get_device_name()})" if pipe.device.type == "cuda" else
                                 f" ({torch.get_num_threads()} threads)")
    print(f"{args.model} on {device}, loaded in {load_s:.1f} s; concept {args.concept}", flush=True)
    with tempfile.TemporaryDirectory() as cache:
        context = Context(cache_dir=cache, progress=False)
        cold_s, _ = hardened(pipe, spec, context, 0, 0, "closed-form")  # the prior, computed once and cached
        plain_s, _ = hardened(pipe, spec, context, 0, 0, "closed-form")
        cf_s, cf_rounds = hardened(pipe, spec, context, 2, args.steps, "closed-form")
        a_s, a_rounds = hardened(pipe, spec, context, 2, args.steps, "closed-form+soft")
        _, b_rounds = hardened(pipe, spec, context, 2, args.steps + 2, "closed-form+soft")
    round_cf = cf_rounds[-1]["seconds"]  # closed form + re-solve
    round_a, round_b = a_rounds[-1]["seconds"], b_rounds[-1]["seconds"]
    per_step = max(0.0, (round_b - round_a) / 2)  # one Adam step of the soft attack, 1 prompt x 1 sample
    soft_fixed = max(0.0, round_a - round_cf - per_step * args.steps)  # encode + the attack's set-up, per prompt
    pairs = spec.pairs()
    attacked = len({i for q in range(2) for i in pick_pairs(pairs, 1, context.seed, q)})  # prompts of both rounds
    # round 1 also draws the reference images of every prompt either round attacks (2 steps each)
    reference = max(0.0, a_rounds[0]["seconds"] - round_a) / attacked
    default = StageTConfig()
    width = default.robust_prompts * default.robust_samples
    est_round = round_cf + default.robust_prompts * soft_fixed + per_step * default.robust_steps * width
    est_reference = reference * default.robust_reference_steps / SMALL["robust_reference_steps"]  # per prompt
    row = {"model": args.model, "concept": args.concept, "device": device, "load_seconds": round(load_s, 1),
           "stage_t_cold_seconds": round(cold_s, 2), "stage_t_seconds": round(plain_s, 2),
           "closed_form_round_seconds": round(round_cf, 2), "small_budget": {**SMALL, "robust_steps": args.steps},
           "soft_round_seconds_small": round(round_a, 2), "soft_step_seconds": round(per_step, 3),
           "reference_seconds_small": round(reference, 2),
           "hardened_seconds_small": {"closed-form R=2": round(cf_s, 2), "closed-form+soft R=2": round(a_s, 2)},
           "default_budget": {k: getattr(default, k) for k in ("robust_prompts", "robust_steps", "robust_samples",
                                                               "robust_reference_steps")},
           # linear in prompts x steps x samples: a planning number, not a measurement
           "extrapolated_round_seconds": round(est_round, 1),
           "extrapolated_reference_seconds_per_prompt_attacked": round(est_reference, 1)}
    print(f"stage T plain (prior cached)        {plain_s:9.2f} s   (cold, prior computed: {cold_s:.2f} s)")
    print(f"closed-form round (RECE + re-solve) {round_cf:9.2f} s")
    print(f"soft round, small budget            {round_a:9.2f} s   ({args.steps} steps x 1 prompt x 1 sample)")
    print(f"one soft attack step                {per_step:9.3f} s   (1 prompt x 1 sample)")
    print(f"reference images, small             {reference:9.2f} s   (per prompt, 2 steps, round 1 only)")
    print(f"est. round at the defaults          {est_round:9.1f} s   ({default.robust_prompts} prompts x "
          f"{default.robust_steps} steps x {default.robust_samples} samples; stage V's round: the soft part)")
    print(f"est. reference images               {est_reference:9.1f} s   (per prompt attacked by any round, "
          f"{default.robust_reference_steps} steps)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
