"""Cost per target prompt of every `trce attack` attack, side by side, at SD v1.4 scale.

    python benchmarks/attacks.py                        # sd14-arch (random weights), CPU or the GPU if any
    python benchmarks/attacks.py --device cpu --json runs/attacks-cpu.json
    python benchmarks/attacks.py --model CompVis/stable-diffusion-v1-4 --device cuda

One target prompt (the first of UnlearnDiffAtk's starting prompts when ../shared/data is there),
tiny budgets (plumbing, not attack quality: sd14-arch has random weights). Each attack runs twice,
at `steps` and at `steps + 2` (generations for Ring-A-Bell); the difference gives the cost of one
step, from which the cost at the attack's default budget is extrapolated (linear in steps and in
the step's width: population, candidates or samples; a planning number). `setup` is the work
done once per run (vocabulary, Ring-A-Bell's concept vector), not per target.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import torch

from trce.attacks import ATTACKS, get_attack
from trce.attacks.base import AttackConfig
from trce.attacks.ring_a_bell import pairs_from_file, pairs_from_spec
from trce.attacks.targets import Target
from trce.attacks.vocabulary import spec_banned
from trce.concepts import load_spec
from trce.loading import load_pipeline

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"
TINY = {
    "ring-a-bell": {"tokens": 16, "population": 16, "generations": 1, "elite": 2},
    "mma-text": {"tokens": 20, "steps": 1, "topk": 16, "candidates": 16},
    "unlearndiff": {"tokens": 5, "steps": 1, "blocks": 1, "samples": 1, "reference_steps": 2},
    "soft-prompt": {"tokens": 5, "steps": 1, "samples": 1, "reference_steps": 2},
}
STEP_KEY = {"ring-a-bell": "generations"}
# a step's cost grows about linearly in this budget key (prompts encoded / UNet samples per step)
# (unlearndiff's authors' loop: one sample per step, `blocks` x `steps` steps, plus one judged image per block that
# this benchmark does not draw: no judge here)
WIDTH_KEY = {"ring-a-bell": "population", "mma-text": "candidates", "unlearndiff": "tokens", "soft-prompt": "samples"}


def target() -> Target:
    path = DATA / "nudity-unlearndiff.csv"
    if path.exists():
        from trce.eval.prompts import load_prompts

        row = load_prompts(path)[0]
        return Target(index=0, prompt=row.prompt, seed=row.seed or 0)
    return Target(index=0, prompt="a photo of a woman on the beach, highly detailed", seed=0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd14-arch")
    ap.add_argument("--device", default=None)
    ap.add_argument("--size", type=int, default=None, help="image size of the reference images (default: the model's)")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    t0 = time.time()
    pipe = load_pipeline(args.model, device=args.device)
    load_s = time.time() - t0
    tgt = target()
    spec = load_spec("sexual")
    pairs = pairs_from_file(DATA / "nudity-ring-a-bell.csv") if (DATA / "nudity-ring-a-bell.csv").exists() \
        else pairs_from_spec(spec)
    device = str(pipe.device) + (f" ({torch.cuda.get_device_name()})" if pipe.device.type == "cuda" else
                                 f" ({torch.get_num_threads()} threads)")
    print(f"{args.model} on {device}, loaded in {load_s:.1f} s; target {tgt.prompt[:60]!r}")
    rows = []
    for name in args.attacks.split(","):
        mod = get_attack(name)
        key = STEP_KEY.get(name, "steps")
        runs = []
        for extra in (0, 2):
            budget = mod.Budget(**{**TINY[name], key: TINY[name][key] + extra})
            config = AttackConfig(budget=budget, banned=spec_banned(spec), pairs=tuple(pairs), size=args.size)
            start = time.time()
            (result,) = mod.attack(pipe, [tgt], config, reference=pipe if mod.NEEDS_REFERENCE else None,
                                   progress=False)
            runs.append((time.time() - start, result.seconds, budget))
        (wall_a, per_a, budget_a), (_, per_b, _) = runs
        per_step = max(0.0, (per_b - per_a) / 2)
        default = mod.Budget()
        full, width = getattr(default, key), getattr(default, WIDTH_KEY[name]) / getattr(budget_a, WIDTH_KEY[name])
        full *= getattr(default, "blocks", 1) if getattr(default, "search", "") == "relaxed" else 1
        row = {"attack": name, "budget": dataclasses.asdict(budget_a), "seconds_per_target": round(per_a, 2),
               "setup_seconds": round(wall_a - per_a, 2), "seconds_per_step": round(per_step, 3),
               "default_steps": full, "default_width": f"{WIDTH_KEY[name]}={getattr(default, WIDTH_KEY[name])}",
               # linear in steps and in the step's width: a rough planning number, not a measurement
               "extrapolated_default_seconds": round(per_a + per_step * (full * width - getattr(budget_a, key)), 1)}
        rows.append(row)
        print(f"  {name:<12} {row['seconds_per_target']:8.2f} s/target (tiny)   {row['seconds_per_step']:8.3f} s/{key[:-1]}"
              f"   setup {row['setup_seconds']:6.2f} s", flush=True)
    fastest = min(r["seconds_per_target"] for r in rows) or 1e-9
    print(f"\n{'attack':<12} {'s/target':>9} {'x fastest':>9} {'s/step':>8} {'default budget':>26} {'est. s/target':>14}")
    for r in rows:
        print(f"{r['attack']:<12} {r['seconds_per_target']:9.2f} {r['seconds_per_target'] / fastest:9.1f} "
              f"{r['seconds_per_step']:8.3f} {str(r['default_steps']) + ' x ' + r['default_width']:>26} "
              f"{r['extrapolated_default_seconds']:14.1f}")
    print("s/target: measured at the tiny budget; est.: extrapolated to the default budget, linear in steps and width")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": args.model, "device": device, "load_seconds": round(load_s, 1),
                                               "target": tgt.prompt, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
