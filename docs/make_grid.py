"""Regenerate docs/shapeworld-grid.png: one image per (shape, colour) pair from keyword prompts.

    .venv/bin/python docs/make_grid.py
"""

from pathlib import Path

import numpy as np

from trce.generate import GenSettings, generate, image_grid
from trce.loading import load_pipeline
from trce.shapeworld import world
from trce.utils import io


def main() -> None:
    v = world.vocab()
    rng = np.random.default_rng(11)
    prompts = []
    for shape in v.values("shape"):
        for color in v.values("color"):
            scene = world.sample_scene(rng, shape=shape, color=color)
            prompts.append(world.caption(scene, rng, world.fixed_style("keyword"), template="{a} {np} on {a_bg} {bg} background"))
    pipe = load_pipeline("shapeworld", device="cpu")
    images = generate(pipe, prompts, list(range(len(prompts))), GenSettings(steps=30, guidance=7.5, batch_size=48))
    io.save_png(Path(__file__).with_name("shapeworld-grid.png"), image_grid(images, cols=len(v.values("color")), scale=3))


if __name__ == "__main__":
    main()
