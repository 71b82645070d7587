"""Batched, seeded image generation with a diffusers pipeline.

Each prompt gets its own CPU `torch.Generator`, so an image depends only on (model, prompt, seed,
guidance, steps, size): not on the batch it was drawn in, nor on the device.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from trce.errors import TrceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenSettings:
    steps: int = 30
    guidance: float = 7.5
    height: int | None = None
    width: int | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise TrceError(f"steps must be at least 1, got {self.steps}", field="steps")
        if self.batch_size < 1:
            raise TrceError(f"batch_size must be at least 1, got {self.batch_size}", field="batch_size")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise TrceError(f"{name} must be a positive multiple of 8, got {value}", field=name)


def _batches(order: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield order[start : start + size]


@torch.no_grad()
def generate_iter(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: GenSettings = GenSettings(),
    guidances: Sequence[float] | None = None,
    progress: bool = True,
    desc: str = "generate",
    embeds: torch.Tensor | None = None,
) -> Iterator[tuple[list[int], np.ndarray]]:
    """Yield (indices, images) per batch as they finish; images are uint8 (B, H, W, 3).

    Prompts with different guidance scales are never batched together. With `embeds` ((N, L, D) conditionings
    as the model family encodes them: soft prompts), image i is drawn from embeds[i] instead of prompts[i]'s
    text; the unconditional half of guidance is the empty prompt, as for text.
    """
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    if embeds is not None and len(embeds) != len(prompts):
        raise ValueError("one conditioning per prompt")
    if embeds is not None:
        from trce.families import family_of

        family = family_of(pipe)
    guidances = list(guidances) if guidances is not None else [settings.guidance] * len(prompts)
    by_guidance: dict[float, list[int]] = {}
    for i, g in enumerate(guidances):
        by_guidance.setdefault(float(g), []).append(i)
    bar = tqdm(total=len(prompts), desc=desc, unit="img", disable=not progress, mininterval=1)
    t0 = time.time()
    try:
        for guidance, order in by_guidance.items():
            for idx in _batches(order, settings.batch_size):
                gens = [torch.Generator("cpu").manual_seed(int(seeds[i])) for i in idx]
                text = ({"prompt": [prompts[i] for i in idx]} if embeds is None
                        else family.pipeline_inputs(pipe, embeds[idx]))
                out = pipe(
                    **text,
                    num_inference_steps=settings.steps,
                    guidance_scale=guidance,
                    generator=gens,
                    height=settings.height,
                    width=settings.width,
                    output_type="np",
                )
                images = np.clip(np.round(out.images * 255), 0, 255).astype(np.uint8)
                bar.update(len(idx))
                bar.set_postfix(img_s=f"{bar.n / max(1e-9, time.time() - t0):.2f}")
                yield idx, images
    finally:
        bar.close()


def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], settings: GenSettings = GenSettings(),
             guidances: Sequence[float] | None = None, progress: bool = True) -> np.ndarray:
    """All images at once, in prompt order: uint8 (N, H, W, 3)."""
    result: list[np.ndarray | None] = [None] * len(prompts)
    for idx, images in generate_iter(pipe, prompts, seeds, settings, guidances, progress):
        for i, img in zip(idx, images):
            result[i] = img
    return np.stack(result) if result else np.zeros((0, 0, 0, 3), np.uint8)  # type: ignore[arg-type]


def image_grid(images: np.ndarray, cols: int, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tile uint8 (N, H, W, 3) images into one (rows*H, cols*W, 3) picture with white gaps."""
    n, h, w, c = images.shape
    rows = -(-n // cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for k, img in enumerate(images):
        r, q = divmod(k, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = img
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


def generate_images(pipe, prompts: str | Sequence[str], seeds: int | Sequence[int] = 0, *, n: int = 1,
                    steps: int = 30, guidance: float = 7.5, size: int | None = None, edit=None,
                    hidden_prompt: bool = False, progress: bool = True) -> np.ndarray:
    """Seeded images, uint8 (N, H, W, 3): `trce generate` in Python (`trce.generate_images`).

    prompts  one prompt (drawn `n` times, seeds seed, seed+1, ...) or a list (one seed each: `seeds` a list)
    edit     an `Edit` applied for the duration (the pipeline is left as it was); hidden_prompt: also inject a
             KPOP edit's hidden prompt (does the concept come back?)
    """
    import contextlib

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TrceError(f"n must be at least 1, got {n!r}", field="n")
    if isinstance(prompts, str):
        if not isinstance(seeds, int) or isinstance(seeds, bool):
            raise TrceError(f"seeds must be one integer for one prompt, got {seeds!r}", field="seed")
        prompts, seeds = [prompts] * n, [seeds + k for k in range(n)]
    else:
        prompts = list(prompts)
        seeds = [seeds + k for k in range(len(prompts))] if isinstance(seeds, int) else list(seeds)
    if hidden_prompt and edit is None:
        raise TrceError("hidden_prompt needs an edit (a KPOP patch)", field="hidden_prompt")
    settings = GenSettings(steps=steps, guidance=guidance, height=size, width=size)
    with contextlib.ExitStack() as stack:
        if edit is not None:
            stack.enter_context(edit.applied(pipe))
        if hidden_prompt:
            from trce.methods.kpop import hidden_prompt_installed

            stack.enter_context(hidden_prompt_installed(pipe, edit))
        return generate(pipe, prompts, seeds, settings, progress=progress)
