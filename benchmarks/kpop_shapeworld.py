"""KPOP on ShapeWorld: erase three shapes at once (circle, star, triangle; the `shapeworld-3shapes` setting).

Writes a patch (with its hidden prompt) that `trce eval` / `trce generate --patch DIR
--with-hidden-prompt` can use, and a picture of the recovery effect (paper Fig. 6): for every
shape, images of the original model | the erased model | the erased model with the hidden prompt,
with the detector's top-1 shape agreement for each panel (a quick readout, not the suite's
ESR/PSR).

    python benchmarks/kpop_shapeworld.py --out runs/kpop-3shapes            # 1000 iterations (the paper's)
    python benchmarks/kpop_shapeworld.py --out /tmp/kpop --iterations 10    # a smoke run

The erase prompts are ShapeWorld captions that always name the shape, by keyword, `spec` synonym
or `spec` paraphrase (never the held-out expressions, which the evaluation keeps for itself).
Interrupted runs resume from `OUT.ckpt/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from trce.generate import GenSettings, generate, image_grid
from trce.loading import load_pipeline
from trce.methods.kpop import KPOPConfig, erase_kpop, generate_with_hidden_prompt
from trce.shapeworld import world
from trce.utils import io

ERASED = ("circle", "star", "triangle")


def erase_prompts(per_shape: int, seed: int) -> list[str]:
    """Captions naming each erased shape (keyword / spec synonym / spec paraphrase), deduplicated, in order."""
    style = world.CaptionStyle(forms=world.TRAIN_STYLE.forms, mention={**world.TRAIN_STYLE.mention, "shape": 1.0},
                               group="spec")
    out: list[str] = []
    for k, shape in enumerate(ERASED):
        rng = np.random.default_rng([seed, 7, k])
        found = [shape]  # the bare keyword is always one of them
        for _ in range(100 * per_shape):
            if len(found) >= per_shape:
                break
            text = world.caption(world.sample_scene(rng, shape=shape), rng, style)
            if text not in found:
                found.append(text)
        out.extend(found)
    return out


def grid_prompts(n_seeds: int, seed: int) -> tuple[list[str], list[str]]:
    """Keyword captions, `n_seeds` per shape (all six shapes, erased ones first)."""
    shapes = list(ERASED) + [s for s in world.vocab().values("shape") if s not in ERASED]
    rng = np.random.default_rng([seed, 11])
    prompts, labels = [], []
    for shape in shapes:
        for _ in range(n_seeds):
            prompts.append(world.caption(world.sample_scene(rng, shape=shape), rng, world.fixed_style("keyword", "spec")))
            labels.append(shape)
    return prompts, labels


def recovery_grid(pipe, edit, out: Path, n_seeds: int, seed: int) -> dict:
    from trce.shapeworld.check import classify

    prompts, labels = grid_prompts(n_seeds, seed)
    seeds = [seed * 1000 + i for i in range(len(prompts))]
    settings = GenSettings(steps=30, guidance=7.5, batch_size=64)
    panels = {"original": generate(pipe, prompts, seeds, settings, progress=False)}
    with edit.applied(pipe):
        panels["erased"] = generate(pipe, prompts, seeds, settings, progress=False)
        panels["erased+hidden_prompt"] = generate_with_hidden_prompt(pipe, edit, prompts, seeds, settings,
                                                                     progress=False)
    readout = {}
    for name, images in panels.items():
        top1 = classify(images)["shape"]
        hit = np.array([p == s for p, s in zip(top1, labels)])
        erased = np.array([s in ERASED for s in labels])
        readout[name] = {"shape_agreement_erased": float(hit[erased].mean()),
                         "shape_agreement_preserved": float(hit[~erased].mean())}
    grids = [image_grid(images, cols=n_seeds, scale=3) for images in panels.values()]
    gap = np.full((grids[0].shape[0], 12, 3), 255, np.uint8)
    io.save_png(out, np.concatenate([grids[0], gap, grids[1], gap, grids[2]], axis=1))
    io.write_json(out.with_suffix(".json"), {"panels": list(panels), "rows": "one shape per row, erased first",
                                             "prompts": prompts, "seeds": seeds, "detector": readout})
    return readout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapeworld")
    p.add_argument("--out", type=Path, default=Path("runs/kpop-3shapes"), help="patch folder to write")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-shape", type=int, default=8, help="erase prompts per shape")
    p.add_argument("--grid-seeds", type=int, default=6, help="images per shape in the recovery grid (0: none)")
    for field in dataclasses.fields(KPOPConfig):
        if field.name in ("seed",):
            continue
        default = field.default
        kind = type(default) if default is not None else int
        p.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=default)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(KPOPConfig) if f.name != "seed"}
    config = KPOPConfig(seed=args.seed, **values)
    prompts = erase_prompts(args.per_shape, args.seed)
    pipe = load_pipeline(args.model, device=args.device)
    t0 = time.time()
    spec = {"name": "shapeworld-3shapes", "erase": {"shape": list(ERASED)}, "prompts": prompts}
    ckpt = args.out.with_name(args.out.name + ".ckpt")
    edit = erase_kpop(pipe, prompts, config, spec=spec, checkpoint_dir=ckpt)
    edit.save(args.out, config={"kpop": dataclasses.asdict(config), "model": args.model, "per_shape": args.per_shape},
              seeds={"seed": args.seed})
    shutil.rmtree(ckpt, ignore_errors=True)  # the patch is written: nothing left to resume
    summary = {"patch": str(args.out), "erase_prompts": len(prompts), "seconds": round(time.time() - t0, 1),
               "seconds_per_iteration": edit.info["seconds_per_iteration"], "loss": edit.info["loss"]}
    if args.grid_seeds > 0:
        summary["recovery"] = recovery_grid(pipe, edit, args.out / "recovery.png", args.grid_seeds, args.seed)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
