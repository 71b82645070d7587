"""`trce demo`: what the quick start runs.

For now it shows what ShapeWorld draws: one image per (colour, shape) pair for keyword, synonym
and paraphrase prompts, as grids (rows: shapes, columns: colours), plus the detector's agreement.
Erasure and evaluation join it as those commands land.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from trce.generate import GenSettings, generate, image_grid
from trce.shapeworld import world
from trce.utils import io

log = logging.getLogger(__name__)


def grid_prompts(form: str, seed: int) -> tuple[list[str], list[world.Scene]]:
    """One prompt per (shape, colour), shapes by row, colours by column."""
    v = world.vocab()
    rng = np.random.default_rng([seed, 31, world.FORMS.index(form)])
    prompts, scenes = [], []
    for shape in v.values("shape"):
        for color in v.values("color"):
            scene = world.sample_scene(rng, shape=shape, color=color)
            prompts.append(world.caption(scene, rng, world.fixed_style(form, "heldout")))
            scenes.append(scene)
    return prompts, scenes


def run_demo(out: Path, device: str | None = None, seed: int = 0) -> dict:
    from trce.loading import load_pipeline
    from trce.shapeworld.check import classify

    pipe = load_pipeline("shapeworld", device=device)
    settings = GenSettings(steps=30, guidance=7.5, batch_size=48)
    cols = len(world.vocab().values("color"))
    summary = {}
    for form in world.FORMS:
        prompts, scenes = grid_prompts(form, seed)
        seeds = [seed * 1000 + i for i in range(len(prompts))]
        images = generate(pipe, prompts, seeds, settings, progress=True)
        pred = classify(images)
        acc = {a: float(np.mean([p == s.attribute(a) for p, s in zip(pred[a], scenes)])) for a in ("color", "shape")}
        io.save_png(out / f"grid-{form}.png", image_grid(images, cols=cols, scale=3))
        io.write_json(out / f"grid-{form}.json", {"prompts": prompts, "seeds": seeds, "detector_accuracy": acc})
        summary[form] = acc
    io.write_json(out / "run.json", io.run_record({"model": "shapeworld", "steps": 30, "guidance": 7.5}, {"seed": seed},
                                                  summary=summary))
    return summary


def format_summary(out: Path, summary: dict) -> str:
    lines = [f"ShapeWorld grids written to {out}/ (rows: shapes, columns: colours)",
             "prompt group   colour  shape   (detector agreement with the prompt)"]
    lines += [f"{form:<13}  {acc['color']:.3f}   {acc['shape']:.3f}" for form, acc in summary.items()]
    return "\n".join(lines)
