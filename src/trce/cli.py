"""The `trce` command line. The library does the work; this module parses, does I/O and reports.

User mistakes raise `TrceError` and end as one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

from trce.errors import TrceError

log = logging.getLogger("trce")

EXAMPLES = """examples:
  trce demo                                   # erase, evaluate and report on ShapeWorld (the quick start)
  trce info --model sd14-arch                 # parameter counts of SD v1.4's architecture, no download
  trce generate --model shapeworld --prompt "a crimson star on a black background" --seed 0 --out x.png
  trce shapeworld check --n 600 --json        # the ShapeWorld quality bar
  trce shapeworld train --out runs/sw         # rebuild every ShapeWorld component from scratch
"""


# Modules that add subcommands: each has `add_commands(sub, parser_kwargs, add_model_args)`.
COMMAND_MODULES: list[str] = ["trce.cli_erase", "trce.cli_eval", "trce.cli_report", "trce.cli_attack"]


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _parser_kwargs(help_text: str, examples: str) -> dict:
    return {"help": help_text, "description": help_text, "epilog": "examples:\n" + examples, "formatter_class": _Formatter}


def _add_model_args(p: argparse.ArgumentParser, default: str | None = "shapeworld") -> None:
    p.add_argument("--model", default=default, required=default is None,
                   help="shapeworld, sd14-arch, a local diffusers folder, or a hub id such as CompVis/stable-diffusion-v1-4")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on GPU, fp32 on CPU")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trce",
        description="Reliable concept erasure for text-to-image diffusion models, with an offline testbed (ShapeWorld).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    from trce import __version__

    parser.add_argument("--version", action="version", version=f"trce {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("info", **_parser_kwargs(
        "Describe a model: components, parameter counts, device, dtype, fingerprint.",
        "  trce info --model shapeworld\n  trce info --model sd14-arch --json\n"))
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", **_parser_kwargs(
        "Generate images from a prompt (one per seed).",
        '  trce generate --prompt "a crimson star on a black background" --seed 0 --out x.png\n'
        '  trce generate --prompt "a red circle" --seed 0 --n 8 --out grid.png\n'
        '  trce generate --patch runs/kpop --with-hidden-prompt --prompt "a red star" --n 8 --out recovered.png\n'))
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed+k")
    p.add_argument("--n", type=int, default=1, help="number of images (tiled into one grid when > 1)")
    p.add_argument("--steps", type=int, default=30, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--size", type=int, default=None, help="image height and width (default: the model's)")
    p.add_argument("--patch", default=None, help="apply an erasure patch folder first")
    p.add_argument("--with-hidden-prompt", action="store_true",
                   help="also install the patch's hidden prompt (KPOP): shows whether the concept was moved, not destroyed")
    p.add_argument("--out", required=True, help="output PNG path")
    p.set_defaults(func=cmd_generate)

    sw = sub.add_parser("shapeworld", help="train and check the bundled miniature model",
                        description="ShapeWorld: the miniature Stable Diffusion trce ships.", epilog=EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    swsub = sw.add_subparsers(dest="sw_command", metavar="SUBCOMMAND")
    swsub.required = True
    p = swsub.add_parser("train", **_parser_kwargs(
        "Train every ShapeWorld component from scratch (resumable: rerun the same command to continue).",
        "  trce shapeworld train --out runs/sw               # about 1.5-2 h on 2 CPU cores, minutes on a GPU\n"
        "  trce shapeworld train --out runs/sw --ship        # and install the result into the package\n"
        "  trce shapeworld train --out /tmp/t --tiny         # a seconds-long smoke run\n"))
    p.add_argument("--out", required=True, help="run folder (created; reused to resume)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--tiny", action="store_true", help="a seconds-long configuration for smoke tests")
    p.add_argument("--pool-size", type=int, default=None, help="number of rendered training images")
    p.add_argument("--clip-steps", type=int, default=None)
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--detector-steps", type=int, default=None)
    p.add_argument("--unet-steps", type=int, default=None)
    p.add_argument("--unet-batch", type=int, default=None)
    p.add_argument("--clip-lr", type=float, default=None)
    p.add_argument("--clip-aux-weight", type=float, default=None,
                   help="weight of the attribute heads added to the contrastive CLIP loss (default 1.0; 0 = pure CLIP)")
    p.add_argument("--warm-start", default=None, metavar="RUN",
                   help="a finished run folder whose CLIP and UNet initialise this one (fine-tune, not from scratch)")
    p.add_argument("--ship", action="store_true", help="copy the exported pipeline into the installed package")
    p.set_defaults(func=cmd_shapeworld_train)

    p = swsub.add_parser("check", **_parser_kwargs(
        "Measure the ShapeWorld quality bar: detector agreement with keyword, synonym and paraphrase prompts.",
        "  trce shapeworld check\n  trce shapeworld check --n 300 --json\n"))
    _add_model_args(p)
    p.add_argument("--n", type=int, default=600, help="images in all, split over the three prompt groups")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_shapeworld_check)

    p = sub.add_parser("demo", **_parser_kwargs(
        "The quick start: erase red from ShapeWorld with UCE, TRCE (T and T+V) and KPOP, evaluate every model on "
        "keyword, held-out synonym and paraphrase prompts and on what must be preserved, and write report.html.",
        "  trce demo\n  trce demo --out runs/demo --limit 100 --steps 30\n  trce demo --methods uce,trce-T\n"))
    p.add_argument("--out", default="trce-demo", help="output folder (rerun to resume)")
    p.add_argument("--methods", default=None, help="comma-separated subset of uce, trce-T, trce-T+V, kpop")
    p.add_argument("--model", default="shapeworld", help="shapeworld, or another pipeline folder with its vocabulary")
    p.add_argument("--limit", type=int, default=40, help="evaluation prompts per group")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps of the evaluation images")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    import importlib

    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub, _parser_kwargs, _add_model_args)
    return parser


# --------------------------------------------------------------------------- commands
def cmd_info(args) -> int:
    from trce.loading import fingerprint, load_pipeline, parameter_counts

    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    counts = parameter_counts(pipe)
    info = {
        "model": args.model,
        "device": str(pipe.device),
        "dtype": str(pipe.unet.dtype).replace("torch.", ""),
        "parameters": counts,
        "parameters_total": sum(counts.values()),
        "unet_sample_size": pipe.unet.config.sample_size,
        "image_size": pipe.unet.config.sample_size * pipe.vae_scale_factor,
        "text_width": pipe.text_encoder.config.hidden_size,
        "max_tokens": pipe.tokenizer.model_max_length,
        "cross_attention_layers": sum(1 for n, _ in pipe.unet.named_modules() if n.endswith("attn2")),
        "fingerprint": fingerprint(pipe)["id"],
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model        {info['model']}  ({info['device']}, {info['dtype']})")
    for name, n in counts.items():
        print(f"{name:<12} {n / 1e6:9.2f} M parameters")
    print(f"{'total':<12} {info['parameters_total'] / 1e6:9.2f} M parameters")
    print(f"image        {info['image_size']}x{info['image_size']} (latent {info['unet_sample_size']}x{info['unet_sample_size']})")
    print(f"text         width {info['text_width']}, {info['max_tokens']} tokens; {info['cross_attention_layers']} cross-attention layers")
    print(f"fingerprint  {info['fingerprint']}")
    return 0


def cmd_generate(args) -> int:
    from trce.generate import GenSettings, generate, image_grid
    from trce.loading import load_pipeline
    from trce.utils import io

    if args.n < 1:
        raise TrceError(f"--n must be at least 1, got {args.n}")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise TrceError(f"--out must end in .png, got {args.out!r}")
    if args.with_hidden_prompt and not args.patch:
        raise TrceError("--with-hidden-prompt needs --patch DIR (a KPOP patch)")
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, patch=args.patch)
    settings = GenSettings(steps=args.steps, guidance=args.guidance, height=args.size, width=args.size)
    seeds = [args.seed + k for k in range(args.n)]
    with contextlib.ExitStack() as stack:
        if args.with_hidden_prompt:
            from trce.edit import load_patch
            from trce.methods.kpop import hidden_prompt_installed

            stack.enter_context(hidden_prompt_installed(pipe, load_patch(args.patch)))
        images = generate(pipe, [args.prompt] * args.n, seeds, settings, progress=args.n > 1)
    picture = images[0] if args.n == 1 else image_grid(images, cols=min(8, args.n))
    io.save_png(out, picture)
    io.write_json(out.with_suffix(".json"), io.run_record(
        {"model": args.model, "prompt": args.prompt, "steps": args.steps, "guidance": args.guidance,
         "size": args.size, "patch": args.patch, "with_hidden_prompt": args.with_hidden_prompt}, seeds))
    log.info("wrote %s", out)
    return 0


def cmd_shapeworld_train(args) -> int:
    from dataclasses import replace

    from trce.shapeworld.train import TrainConfig, Trainer, ship

    cfg = TrainConfig.tiny(seed=args.seed) if args.tiny else TrainConfig(seed=args.seed)
    overrides = {k: getattr(args, k) for k in ("pool_size", "clip_steps", "vae_steps", "detector_steps", "unet_steps",
                                               "unet_batch", "clip_lr", "clip_aux_weight", "warm_start") if getattr(args, k) is not None}
    cfg = replace(cfg, device=args.device, **overrides)
    export = Trainer(args.out, cfg).run()
    log.info("ShapeWorld pipeline written to %s", export)
    if args.ship:
        dest = ship(export)
        log.info("installed into %s", dest)
    return 0


def cmd_shapeworld_check(args) -> int:
    from trce.generate import GenSettings
    from trce.loading import load_pipeline
    from trce.shapeworld.check import format_table, run_check

    if args.n < 3:
        raise TrceError(f"--n must be at least 3 (one image per group), got {args.n}")
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    settings = GenSettings(steps=args.steps, guidance=args.guidance, batch_size=100)
    result = run_check(pipe, n=args.n, seed=args.seed, settings=settings, progress=not args.json)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return 0 if result["passed"] else 1


def cmd_demo(args) -> int:
    import time

    from trce.demo import DemoConfig, run_demo

    t0 = time.perf_counter()
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else None
    cfg = DemoConfig(limit=args.limit, steps=args.steps, seed=args.seed, device=args.device, model=args.model,
                     **({"methods": methods} if methods else {}))
    table = run_demo(Path(args.out), cfg)
    print(table, end="")
    print(f"\nreport: {Path(args.out) / 'report.html'}  ({time.perf_counter() - t0:.0f} s)")
    return 0


# --------------------------------------------------------------------------- entry point
def _quiet_libraries(verbose: bool) -> None:
    """Keep diffusers/transformers chatter (load reports, per-component bars) out of the user's terminal."""
    if verbose:
        return
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="trce: %(message)s", stream=sys.stderr)
    _quiet_libraries(verbose=args.verbose)
    try:
        return int(args.func(args) or 0)
    except TrceError as exc:
        print(f"trce: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("trce: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
