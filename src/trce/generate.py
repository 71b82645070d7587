"""Batched, seeded image generation with a diffusers pipeline.

An image depends only on (model, prompt, seed, guidance, steps, size) and the device and dtype it is drawn on:
not on the batch it was drawn in, its neighbours or its place in the list, so a resumed evaluation gives the
images an uninterrupted one gives. Two things make that true:

- each prompt gets its own CPU `torch.Generator` (its initial noise does not depend on the device);
- the pipeline is always called with the same number of prompts, `chunk_size(height, width)` (16 for ShapeWorld's
  32x32, 4 for SD's 512x512, 1 above 724x724: about a million pixels a call), the last call of a run padded with
  copies of its last prompt. Batched matrix products round differently for different batch sizes (one grey level
  in a few pixels between 8 and 100 prompts a call), never for the same one. `batch_size` only says how many
  images are handed back (judged and recorded) together.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from trce.errors import TrceError, check_integer, check_seed

log = logging.getLogger(__name__)

# The largest image side trce draws. SD-class models are trained at 512-1024 px and draw repeated, broken objects
# far above their size, and a 2048x2048 image already needs tens of GB in an SD 1.x UNet's attention layers.
MAX_SIZE = 2048
DRAW_PIXELS = 1 << 20  # pixels per pipeline call (a power-of-two number of images, at most MAX_CHUNK)
MAX_CHUNK = 16


def check_size(value, field: str = "size") -> None:
    """An image side: None (the model's own) or a multiple of 8 from 8 to MAX_SIZE."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8:
        raise TrceError(f"{field} must be a positive multiple of 8 (the VAE halves the side three times), "
                        f"got {value!r}", field=field)
    if value > MAX_SIZE:
        raise TrceError(f"{field} must be at most {MAX_SIZE}, got {value}: SD-class models are trained at "
                        f"512-1024 px and {MAX_SIZE} px already needs tens of GB", field=field)


def check_guidance(value, field: str = "guidance") -> None:
    """A classifier-free guidance scale: a finite number >= 0 (1 or less draws without guidance)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise TrceError(f"{field} must be a finite number >= 0 (1 or less: no classifier-free guidance), "
                        f"got {value!r}", field=field)


MAX_IMAGES = 1024  # images of one `generate_images` call (one grid): beyond it a picture is no longer readable


def check_images(n) -> None:
    """The number of images of one call: 1 to MAX_IMAGES."""
    check_count(n, "n")
    if n > MAX_IMAGES:
        raise TrceError(f"n must be at most {MAX_IMAGES}, got {n}: one call draws one grid of images; draw more "
                        "with several calls or `trce eval --prompts FILE`", field="n")


def check_count(value, field: str) -> None:
    """A count (steps, images, batch size, limit): an integer >= 1 (`trce.errors.check_integer`)."""
    check_integer(value, field, at_least=1)


def chunk_size(height: int, width: int) -> int:
    """Prompts per pipeline call at this size: the largest power of two with at most DRAW_PIXELS pixels in all,
    from 1 to MAX_CHUNK. Every call draws exactly this many (see the module doc)."""
    n = max(1, min(MAX_CHUNK, DRAW_PIXELS // (height * width)))
    return 1 << (n.bit_length() - 1)


@dataclass(frozen=True)
class GenSettings:
    steps: int = 30
    guidance: float = 7.5
    height: int | None = None
    width: int | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        check_count(self.steps, "steps")
        check_guidance(self.guidance)
        check_count(self.batch_size, "batch_size")
        for name in ("height", "width"):
            check_size(getattr(self, name), name)


def check_settings(pipe, settings: GenSettings) -> None:
    """What only the model can tell: `steps` within its scheduler's training steps."""
    most = getattr(getattr(pipe, "scheduler", None), "config", {}).get("num_train_timesteps")
    if most is not None and settings.steps > int(most):
        raise TrceError(f"steps must be at most {most} (the scheduler's training steps), got {settings.steps}",
                        field="steps")


def warn_long_prompts(pipe, prompts: Sequence[str]) -> int:
    """Say (one log line) how many prompts are longer than the model reads: the text encoder sees only their
    first tokens. Returns how many."""
    from trce.families import family_of

    tok = family_of(pipe).tokenizer(pipe)
    limit = int(tok.model_max_length)
    # a token covers at least one character, so only prompts longer than the context can be cut
    lengths = {p: len(tok(p, truncation=False).input_ids) for p in set(prompts) if len(p) > limit - 2}
    long = [i for i, p in enumerate(prompts) if lengths.get(p, 0) > limit]
    if long:
        first = prompts[long[0]]
        log.warning("%d of %d prompts %s longer than the model's %d tokens and %s truncated to them (the text "
                    "encoder reads no further); the first, #%d, has %d tokens: %r", len(long), len(prompts),
                    "is" if len(long) == 1 else "are", limit, "is" if len(long) == 1 else "are", long[0],
                    lengths[first], first[:60] + ("..." if len(first) > 60 else ""))
    return len(long)


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or (
        isinstance(exc, RuntimeError) and ("out of memory" in text or "not enough memory" in text
                                           or "can't allocate memory" in text))


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
    """Yield (indices, images) per batch of `settings.batch_size` as they finish; images are uint8 (B, H, W, 3).

    Prompts with different guidance scales are never drawn together; each is drawn in calls of exactly
    `chunk_size` prompts (see the module doc). With `embeds` ((N, L, D) conditionings as the model family encodes
    them: soft prompts), image i is drawn from embeds[i] instead of prompts[i]'s text; the unconditional half of
    guidance is the empty prompt, as for text.
    """
    from trce.families import family_of

    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    if embeds is not None and len(embeds) != len(prompts):
        raise ValueError("one conditioning per prompt")
    family = family_of(pipe)
    check_settings(pipe, settings)
    guidances = list(guidances) if guidances is not None else [settings.guidance] * len(prompts)
    by_guidance: dict[float, list[int]] = {}
    for i, g in enumerate(guidances):
        check_guidance(g)
        by_guidance.setdefault(float(g), []).append(i)
    native = family.image_size(pipe)
    height, width = settings.height or native, settings.width or native
    chunk = chunk_size(height, width)
    bar = tqdm(total=len(prompts), desc=desc, unit="img", disable=not progress, mininterval=1)
    t0 = time.time()
    try:
        for guidance, order in by_guidance.items():
            ready: list[tuple[int, np.ndarray]] = []
            for start in range(0, len(order), chunk):
                idx = order[start : start + chunk]
                padded = idx + [idx[-1]] * (chunk - len(idx))  # the same call size every time: same rounding
                gens = [torch.Generator("cpu").manual_seed(int(seeds[i])) for i in padded]
                text = ({"prompt": [prompts[i] for i in padded], **family.draw_kwargs(pipe)} if embeds is None
                        else family.pipeline_inputs(pipe, embeds[padded]))
                try:
                    out = pipe(**text, num_inference_steps=settings.steps, guidance_scale=guidance, generator=gens,
                               height=height, width=width, output_type="np")
                except (RuntimeError, MemoryError) as exc:
                    if not isinstance(exc, MemoryError) and not _out_of_memory(exc):
                        raise
                    raise TrceError(f"size {height}x{width} does not fit in memory on {family.denoiser(pipe).device} "
                                    f"({chunk} image{'s' if chunk > 1 else ''} a call); choose a smaller size",
                                    field="size") from exc
                images = np.clip(np.round(out.images[: len(idx)] * 255), 0, 255).astype(np.uint8)
                ready.extend(zip(idx, images))
                bar.update(len(idx))
                bar.set_postfix(img_s=f"{bar.n / max(1e-9, time.time() - t0):.2f}")
                last = start + chunk >= len(order)
                while len(ready) >= settings.batch_size or (last and ready):
                    batch, ready = ready[: settings.batch_size], ready[settings.batch_size :]
                    yield [i for i, _ in batch], np.stack([img for _, img in batch])
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

    check_images(n)
    check_size(size)
    if isinstance(prompts, str):
        if not isinstance(seeds, int) or isinstance(seeds, bool):
            raise TrceError(f"seeds must be one integer for one prompt, got {seeds!r}", field="seed")
        prompts, seeds = [prompts] * n, [seeds + k for k in range(n)]
    else:
        prompts = list(prompts)
        seeds = [seeds + k for k in range(len(prompts))] if isinstance(seeds, int) else list(seeds)
    for seed in seeds:  # image k's seed is seed + k: every one in range
        check_seed(seed, "seed")
    if hidden_prompt and edit is None:
        raise TrceError("hidden_prompt needs an edit (a KPOP patch)", field="hidden_prompt")
    settings = GenSettings(steps=steps, guidance=guidance, height=size, width=size)
    with contextlib.ExitStack() as stack:
        if edit is not None:
            stack.enter_context(edit.applied(pipe))
        if hidden_prompt:
            from trce.prompt_injection import hidden_prompt_installed

            stack.enter_context(hidden_prompt_installed(pipe, edit))
        warn_long_prompts(pipe, prompts)
        return generate(pipe, prompts, seeds, settings, progress=progress)
