"""`trce shapeworld train` and `trce shapeworld check`: build and measure the miniature model trce ships."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging

from trce.cli.common import EXAMPLES, add_model_args, parser_kwargs
from trce.errors import TrceError, check_seed

log = logging.getLogger("trce")


def register(sub) -> None:
    sw = sub.add_parser("shapeworld", help="train and check the bundled miniature model",
                        description="ShapeWorld: the miniature Stable Diffusion trce ships.", epilog=EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    swsub = sw.add_subparsers(dest="sw_command", metavar="SUBCOMMAND")
    swsub.required = True
    p = swsub.add_parser("train", **parser_kwargs(
        "Train every ShapeWorld component from scratch (resumable: rerun the same command to continue).",
        "  trce shapeworld train --out runs/sw               # about 1.5-2 h on 2 CPU cores, minutes on a GPU\n"
        "  trce shapeworld train --out runs/sw --ship        # and install the result into the package\n"
        "  trce shapeworld train --out /tmp/t --tiny         # a seconds-long smoke run\n"
        "  trce shapeworld train --out runs/no-red --warm-start shapeworld --clip-steps 0 --exclude color=red\n"
        "                                                    # a UNet that never saw red (the retrained reference)\n"
        "  trce shapeworld train --family sdxl --out runs/xl --ship   # ShapeWorld-XL: an SDXL denoiser around it\n"
        "  trce shapeworld train --family sd3 --out runs/dit --ship   # ShapeWorld-DiT: an SD3 transformer\n"))
    p.add_argument("--out", required=True, help="run folder (created; reused to resume)")
    p.add_argument("--family", default="sd1", choices=["sd1", "sdxl", "sd3"],
                   help="sd1: every ShapeWorld component (the shipped model); sdxl / sd3: the denoiser of "
                        "ShapeWorld-XL / ShapeWorld-DiT, around the shipped text encoder and VAE")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--tiny", action="store_true", help="a seconds-long configuration for smoke tests")
    p.add_argument("--pool-size", type=int, default=None, help="number of rendered training images")
    p.add_argument("--clip-steps", type=int, default=None)
    p.add_argument("--vae-steps", type=int, default=None)
    p.add_argument("--detector-steps", type=int, default=None)
    p.add_argument("--unet-steps", type=int, default=None, help="denoiser steps (sdxl / sd3 too)")
    p.add_argument("--unet-batch", type=int, default=None, help="denoiser batch (sdxl / sd3 too)")
    p.add_argument("--clip-lr", type=float, default=None)
    p.add_argument("--clip-aux-weight", type=float, default=None,
                   help="weight of the attribute heads added to the contrastive CLIP loss (default 1.0; 0 = pure CLIP)")
    p.add_argument("--warm-start", default=None, metavar="RUN",
                   help="a finished run folder whose CLIP and UNet (sdxl / sd3: whose denoiser) initialise this one "
                        "(fine-tune, not from scratch)")
    p.add_argument("--exclude", default=None, metavar="ATTRIBUTE=VALUE",
                   help="the UNet never sees an image showing it (e.g. color=red) and starts from scratch: the "
                        "retrained reference an erasure is judged against")
    p.add_argument("--ship", action="store_true",
                   help="install the exported model into the package, replacing the shipped one (the detector too), "
                        "once it passes the quality bar of `trce shapeworld check`; the replaced folder is kept beside "
                        "it. Refused with --tiny or --exclude")
    p.set_defaults(func=cmd_train)

    p = swsub.add_parser("check", **parser_kwargs(
        "Measure the ShapeWorld quality bar: detector agreement with keyword, synonym and paraphrase prompts.",
        "  trce shapeworld check\n  trce shapeworld check --n 300 --json\n"))
    add_model_args(p)
    p.add_argument("--n", type=int, default=1200, help="images in all, split over the six prompt groups")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_check)


TRAIN_OPTIONS = ("pool_size", "clip_steps", "vae_steps", "detector_steps", "unet_steps", "unet_batch", "clip_lr",
                 "clip_aux_weight", "warm_start", "exclude")


def _check_numbers(args) -> None:
    """Every number `trce shapeworld train` takes, in range before anything is made (`trce.shapeworld.settings`)."""
    from dataclasses import replace

    from trce.shapeworld.settings import MINIATURE_OPTIONS, check_training

    check_seed(args.seed)
    given = {k: getattr(args, k) for k in TRAIN_OPTIONS if getattr(args, k) is not None}
    if args.family == "sd1":
        from trce.shapeworld.training import TrainConfig

        cfg = TrainConfig.tiny(seed=args.seed) if args.tiny else TrainConfig(seed=args.seed)
        check_training(replace(cfg, **given))
    else:
        from trce.shapeworld.miniatures import MiniatureConfig

        cfg = MiniatureConfig.tiny(args.family, seed=args.seed) if args.tiny else MiniatureConfig(args.family)
        options = {**MINIATURE_OPTIONS, "pool_size": "pool_size"}  # miniature field -> option
        check_training(replace(cfg, **{f: given[o] for f, o in options.items() if o in given}))


def _check_out(out) -> None:
    """Refuse an --out inside the installed trce package: only a deliberate --ship writes there."""
    from pathlib import Path

    import trce

    package = Path(trce.__file__).resolve().parent
    target = Path(out).expanduser().resolve()
    if target == package or package in target.parents:
        raise TrceError(f"--out {out} is inside the installed trce package ({package}); train into a folder of your "
                        "own (--ship installs the finished model into the package)", field="out")


def _check_ship(args) -> None:
    """--ship's refusals, before any training and before anything is written."""
    if not args.ship:
        return
    from trce.shapeworld import weights_dir
    from trce.shapeworld.pipelines import miniature_dir
    from trce.shapeworld.ship import check_ship_args

    dest = weights_dir() if args.family == "sd1" else miniature_dir(args.family)
    check_ship_args(tiny=args.tiny, exclude=args.exclude, dest=dest)


def _shipped(kind: str, export, shipped) -> None:
    log.info("ShapeWorld %s written to %s", kind, export)
    if shipped is not None:
        print(f"installed {export} into {shipped.dest}")
        print(f"the weights it replaced are kept in {shipped.backup}" if shipped.backup is not None
              else "there were no weights to replace")


@contextlib.contextmanager
def _nothing_left(out):
    """A run refused before it wrote anything (a --warm-start that is no finished run, ...) leaves no empty --out
    behind: the folders it made for it (--out and its missing parents) are removed again once the run's lock is
    released, each only while empty; folders that were there, and finished work (a resume's), are kept."""
    from pathlib import Path

    made = []  # the folders this run makes, innermost first
    folder = Path(out).expanduser().absolute()
    while not folder.exists() and folder != folder.parent:
        made.append(folder)
        folder = folder.parent
    try:
        yield
    except BaseException:
        for folder in made:
            try:
                folder.rmdir()
            except FileNotFoundError:  # never made (a run refused before it made --out): its parents may be
                continue
            except OSError:  # not empty (work to resume, or another run's lock)
                break
        raise


def cmd_train(args) -> int:
    from trce.shapeworld.train import train
    from trce.utils import io

    _check_numbers(args)
    _check_ship(args)
    io.check_path(args.out, "out")  # a name too long, a loop of links: one clear error before the path is resolved
    _check_out(args.out)
    io.check_writable(args.out, "out")  # before the training, not after its first stage
    if args.family != "sd1":
        return _train_miniature(args)
    with _nothing_left(args.out), io.run_lock(args.out, "out"):  # a second training into the same --out is refused
        export, shipped = train(args.out, seed=args.seed, device=args.device, tiny=args.tiny, ship=args.ship,
                                **{k: getattr(args, k) for k in TRAIN_OPTIONS if getattr(args, k) is not None})
    _shipped("pipeline", export, shipped)
    return 0


def _train_miniature(args) -> int:
    from trce.shapeworld.miniatures import train_miniature
    from trce.utils import io

    sd1_only = [k for k in TRAIN_OPTIONS if k not in ("unet_steps", "unet_batch", "pool_size", "warm_start")
                and getattr(args, k) is not None]
    if sd1_only:
        raise TrceError(f"--{sd1_only[0].replace('_', '-')} trains a part of the sd1 model; --family "
                        f"{args.family} trains only the denoiser (--unet-steps, --unet-batch, --pool-size, "
                        "--warm-start)")
    names = {"unet_steps": "steps", "unet_batch": "batch", "pool_size": "pool_size", "warm_start": "warm_start"}
    overrides = {new: getattr(args, old) for old, new in names.items() if getattr(args, old) is not None}
    with _nothing_left(args.out), io.run_lock(args.out, "out"):
        export, shipped = train_miniature(args.out, args.family, seed=args.seed, device=args.device, tiny=args.tiny,
                                          ship_it=args.ship, **overrides)
    _shipped(f"{args.family} denoiser", export, shipped)
    return 0


def cmd_check(args) -> int:
    from trce.generate import GenSettings
    from trce.loading import load_pipeline
    from trce.shapeworld.check import format_table, run_check

    if args.n < 3:
        raise TrceError(f"--n must be at least 3 (one image per group), got {args.n}")
    check_seed(args.seed)
    settings = GenSettings(steps=args.steps, guidance=args.guidance, batch_size=100)  # checked before loading
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    result = run_check(pipe, n=args.n, seed=args.seed, settings=settings, progress=not args.json)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return 0 if result["passed"] else 1
