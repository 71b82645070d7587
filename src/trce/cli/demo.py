"""`trce demo`: the quick start (erase red from ShapeWorld with every method, evaluate, report)."""

from __future__ import annotations

import time
from pathlib import Path

from trce.cli.common import parser_kwargs
from trce.demo import DemoConfig


def register(sub) -> None:
    p = sub.add_parser("demo", **parser_kwargs(
        "The quick start: erase red from ShapeWorld with UCE, TRCE (T and T+V) and KPOP, evaluate every model on "
        "keyword, held-out synonym and paraphrase prompts and on what must be preserved, and write report.html.",
        "  trce demo\n  trce demo --out runs/demo --limit 100 --steps 30\n  trce demo --methods uce,trce-T\n"))
    p.add_argument("--out", default="trce-demo", help="output folder (rerun to resume)")
    p.add_argument("--methods", default=None, help="comma-separated subset of uce, trce-T, trce-T+V, kpop")
    p.add_argument("--model", default="shapeworld", help="shapeworld, or another pipeline folder with its vocabulary")
    p.add_argument("--limit", type=int, default=DemoConfig.limit,
                   help=f"evaluation prompts per group (default {DemoConfig.limit})")
    p.add_argument("--steps", type=int, default=DemoConfig.steps,
                   help=f"DDIM steps of the evaluation images (default {DemoConfig.steps})")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from trce.demo import run_demo

    t0 = time.perf_counter()
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods is not None else None
    cfg = DemoConfig(limit=args.limit, steps=args.steps, seed=args.seed, device=args.device, model=args.model,
                     **({"methods": methods} if methods is not None else {}))
    table = run_demo(Path(args.out), cfg)
    print(table, end="")
    print(f"\nreport: {Path(args.out) / 'report.html'}  ({time.perf_counter() - t0:.0f} s)")
    return 0
