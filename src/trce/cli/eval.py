"""`trce eval` and `trce suites`: evaluate a model (and a patch) on a suite — one `trce.evaluate` call."""

from __future__ import annotations

import argparse
import json
import logging

from trce.cli.common import add_image_args, add_model_args, image_options, parser_kwargs
from trce.errors import TrceError

log = logging.getLogger("trce")

FLAGS = {"hidden_prompt": "--with-hidden-prompt", "height": "--size", "width": "--size", "prompts": "--prompts"}


def _seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers such as 0,1,2, got {text!r}") from exc


def register(sub) -> None:
    p = sub.add_parser("eval", **parser_kwargs(
        "Evaluate a model (and an erasure patch) on a prompt suite: images, per-prompt verdicts, metrics.json.",
        "  trce eval --model shapeworld --suite shapeworld-red --out runs/eval-orig\n"
        "  trce eval --model shapeworld --patch runs/red-uce --suite shapeworld-red --seeds 0,1,2 --out runs/eval-uce\n"
        "  trce eval --patch runs/red-kpop --with-hidden-prompt --suite shapeworld-red --out runs/eval-kpop-hidden\n"
        "  trce eval --model CompVis/stable-diffusion-v1-4 --patch runs/nudity --suite i2p-sexual \\\n"
        "      --data ../shared/data/prompts --out runs/i2p\n"
        "  trce eval --model sd14-arch --suite i2p-sexual --data ../shared/data/prompts/I2P_prompts_sexual.csv \\\n"
        "      --limit 4 --steps 2 --size 128 --out /tmp/x        # plumbing check on CPU (random weights)\n"
        "  trce eval --prompts my_prompts.txt --detector nudenet --model DIR --out runs/mine\n"
        "  accelerate launch --multi_gpu --num_processes 4 -m trce.cli eval --suite mma --data DIR ... --out runs/mma\n"
        "      # shards prompts over 4 processes (GPUs; on CPUs add --device cpu)\n"
        "  trce suites                                  # the suite names\n"))
    add_model_args(p)
    p.add_argument("--patch", default=None, help="erasure patch folder to evaluate (the model alone when omitted)")
    p.add_argument("--with-hidden-prompt", action="store_true",
                   help="draw with the KPOP patch's hidden prompt injected: how much of the concept it brings back")
    p.add_argument("--suite", default=None, help="a suite name (see `trce suites`) or a suite YAML file")
    p.add_argument("--prompts", default=None, help="evaluate this prompt file instead of a suite (CSV of any "
                   "known layout or TXT, one prompt per line)")
    p.add_argument("--data", default=None, help="the suite's prompt file, or a folder holding it")
    p.add_argument("--limit", type=int, default=None,
                   help="first N prompts of a real suite; N prompts per group of a ShapeWorld suite (caps its n)")
    add_image_args(p)
    p.add_argument("--seeds", type=_seeds, default=(0,),
                   help="seed offsets, e.g. 0,1,2: repeat the run; 0 keeps the suite's seeds, others derive new "
                        "seeds per prompt; metrics report mean ± std and per-seed values")
    p.add_argument("--concept", default=None,
                   help="attribute=value[,value] judged by the shapeworld detector outside ShapeWorld suites")
    p.add_argument("--clip-weights", default=None, help="local transformers CLIP folder for the CLIP score of real suites")
    p.add_argument("--inception-weights", default=None,
                   help="local TorchScript Inception (inception-2015-12-05.pt, as in clean-fid) for FID")
    p.add_argument("--q16-weights", default=None, help="local CLIP ViT-L/14 folder with q16_prompts.safetensors")
    p.add_argument("--reference", action="store_true",
                   help="also generate the original model's images for a real suite (ShapeWorld suites always do)")
    p.add_argument("--reference-cache", default=None,
                   help="folder shared by runs: the original model's images, keyed by base model, suite and settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print metrics.json instead of the table")
    p.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    p.set_defaults(func=cmd_eval, flags=FLAGS)

    p = sub.add_parser("suites", **parser_kwargs(
        "List the built-in evaluation suites (real benchmarks and ShapeWorld concepts).",
        "  trce suites\n  trce suites --json\n"))
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_suites)


def _check_concept(args) -> None:
    """--concept names what the shapeworld detector judges outside ShapeWorld suites; where nothing would read it, it
    is refused rather than ignored: a ShapeWorld suite judges its own concept, other detectors none."""
    if args.concept is None:
        return
    from trce.eval.suites import load_suite
    from trce.shapeworld import world

    attribute, values = world.attribute_values(args.concept, "concept")  # a misspelt concept is named first
    suite = load_suite(args.suite) if args.suite is not None else None
    if suite is not None and suite.kind == "shapeworld":
        if (attribute, set(values)) == (suite.attribute, set(suite.values)):
            return
        own = f"{suite.attribute}={','.join(suite.values)}"
        raise TrceError(f"--concept {args.concept} does not apply to suite {suite.name}: a ShapeWorld suite judges its "
                        f"own concept ({own}); for {args.concept} choose its suite (`trce suites`) or a suite YAML",
                        field="concept")
    detector = args.detector or (suite.detector if suite is not None else "nudenet")
    if detector != "shapeworld":
        raise TrceError(f"--concept {args.concept} is read only by the shapeworld detector; this run's detector is "
                        f"{detector} (add --detector shapeworld to judge {args.concept})", field="concept")


def cmd_eval(args) -> int:
    from trce.eval.options import EvalConfig
    from trce.eval.runner import run_eval
    from trce.eval.summary import format_table

    if args.suite is None and args.prompts is None:
        raise TrceError("give --suite NAME (see `trce suites`) or --prompts FILE")
    if args.with_hidden_prompt and args.patch is None:
        raise TrceError("--with-hidden-prompt needs --patch DIR (a KPOP patch)")
    _check_concept(args)
    config = EvalConfig(
        suite=args.suite, prompts=args.prompts, model=args.model, patch=args.patch, data=args.data, limit=args.limit,
        **image_options(args), seeds=args.seeds, concept=args.concept, clip_weights=args.clip_weights,
        inception_weights=args.inception_weights, q16_weights=args.q16_weights, reference=args.reference,
        reference_cache=args.reference_cache, device=args.device, dtype=args.dtype, progress=not args.no_progress,
        hidden_prompt=args.with_hidden_prompt,
    )
    metrics = run_eval(config, args.out)
    if metrics is None:  # a non-main process of a sharded run: rank 0 reports
        return 0
    if args.json:
        print(json.dumps(metrics, indent=2, default=str))
    else:
        print(format_table(metrics))
        print(f"wrote {args.out}/metrics.json")
    return 0


def cmd_suites(args) -> int:
    from trce.eval.suites import list_suites

    rows = [s.summary() for s in list_suites()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    for kind, title in (("real", "benchmark suites (prompt files: --data PATH)"),
                        ("shapeworld", "ShapeWorld suites (generated from vocab.yaml)")):
        print(title)
        for r in rows:
            if r["kind"] != kind:
                continue
            what = r["source"] if kind == "real" else f"{r['source']}, {r['prompts']}"
            print(f"  {r['name']:<{width}}  {r['detector']:<10} {what}")
    print("describe one: trce suites --json; add your own: --suite path/to/suite.yaml")
    return 0
