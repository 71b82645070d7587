"""The ShapeWorld quality bar: does the model draw what the prompt says, however it is said?

For each prompt group (keyword, synonym, paraphrase) N prompts are drawn over a balanced grid of
colours and shapes, images are generated (DDIM 30 steps, guidance 7.5 by default), and the
attribute detector's top-1 is compared with the prompt. The text encoder is also probed: the
cosine between a colour's direction at its keyword token and at the first [EoT] token.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from trce.generate import GenSettings, generate
from trce.shapeworld import world

log = logging.getLogger(__name__)

GROUPS = ("keyword", "synonym", "paraphrase", "keyword-open", "synonym-open", "paraphrase-open")
# colour and shape accuracy; the -open groups are the open language's held-out constructions and frames
BAR = {"keyword": 0.90, "synonym": 0.85, "paraphrase": 0.85, "keyword-open": 0.90, "synonym-open": 0.90,
       "paraphrase-open": 0.90}


def check_prompts(form: str, n: int, seed: int, group: str = "all") -> tuple[list[str], list[world.Scene]]:
    """n captions in `form`, cycling over every (colour, shape) pair; pattern and background random.

    `form` is keyword, synonym or paraphrase (the world's grammar, every attribute in that form) or the same with
    `-open` (the open language's held-out constructions and frames; a paraphrase-open colour is named by a
    paraphrase or by an object, alternately)."""
    from trce.shapeworld.language import OpenStyle

    v = world.vocab()
    colors, shapes = v.values("color"), v.values("shape")
    base = form.removesuffix("-open")
    rng = np.random.default_rng([seed, world.FORMS.index(base)] + ([1] if form != base else []))
    prompts, scenes = [], []
    for i in range(n):
        scene = world.sample_scene(rng, color=colors[i % len(colors)], shape=shapes[(i // len(colors)) % len(shapes)])
        if form == base:
            prompts.append(world.caption(scene, rng, world.fixed_style(form, group)))
        else:
            forms = {a: {base: 1.0} for a in ("shape", "color", "pattern")}
            if base == "paraphrase" and i % 2:
                forms["color"] = {"object": 1.0}
            style = OpenStyle(group="heldout", words=group, mention={a: 1.0 for a in world.ATTRIBUTES},
                              forms={**forms, "background": {"keyword": 1.0}}, frame=None)
            prompts.append(_open_named(scene, rng, style))
        scenes.append(scene)
    return prompts, scenes


def _open_named(scene, rng, style) -> str:
    """An open caption that names colour and shape (frames that name nothing are drawn again)."""
    from trce.shapeworld.language import open_caption

    while True:
        text, named = open_caption(scene, rng, style)
        if "color" in named and "shape" in named:
            return text


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def classify(images: np.ndarray, det=None, batch: int = 512) -> dict[str, list[str]]:
    from trce.shapeworld import detector

    det = det if det is not None else detector()
    out: dict[str, list[str]] = {a: [] for a in world.ATTRIBUTES}
    for s in range(0, len(images), batch):
        for a, vals in det.predict(to_unit(images[s : s + batch])).items():
            out[a].extend(vals)
    return out


@torch.no_grad()
def keyword_eot_cosine(pipe, n_per_color: int = 24, seed: int = 0) -> dict[str, float]:
    """Cosine between each colour's direction at its keyword token and at the first [EoT].

    direction(c, role) = mean embedding of prompts naming c - mean over all colours, at that role.
    Values near 1 mean an edit of one role leaks into the other.
    """
    tok, text = pipe.tokenizer, pipe.text_encoder
    colors = world.vocab().values("color")
    rng = np.random.default_rng([seed, 77])
    kw, eot = {}, {}
    for c in colors:
        prompts = [world.caption(world.sample_scene(rng, color=c), rng, world.fixed_style("keyword")) for _ in range(n_per_color)]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        hidden = text(ids.to(text.device)).last_hidden_state.float().cpu()  # (n, L, D)
        color_id = tok(c, add_special_tokens=False).input_ids[0]
        kpos = (ids == color_id).float().argmax(1)
        epos = (ids == tok.eos_token_id).float().argmax(1)
        kw[c] = hidden[torch.arange(len(ids)), kpos].mean(0)
        eot[c] = hidden[torch.arange(len(ids)), epos].mean(0)
    mean_kw = torch.stack(list(kw.values())).mean(0)
    mean_eot = torch.stack(list(eot.values())).mean(0)
    out = {c: float(torch.cosine_similarity(kw[c] - mean_kw, eot[c] - mean_eot, dim=0)) for c in colors}
    out["mean"] = float(np.mean(list(out.values())))
    return out


def run_check(pipe, n: int = 600, seed: int = 0, settings: GenSettings | None = None, progress: bool = True) -> dict:
    """Generate n images split over the three groups and score them; returns the JSON-ready result."""
    settings = settings or GenSettings(steps=30, guidance=7.5, batch_size=100)
    t0 = time.time()
    per_group = max(1, n // len(GROUPS))
    groups = {}
    for form in GROUPS:
        prompts, scenes = check_prompts(form, per_group, seed)
        seeds = [seed * 1_000_000 + GROUPS.index(form) * 100_000 + i for i in range(per_group)]  # old groups: as before
        images = generate(pipe, prompts, seeds, settings, progress=progress)
        pred = classify(images)
        groups[form] = {"n": per_group} | {
            a: float(np.mean([p == s.attribute(a) for p, s in zip(pred[a], scenes)])) for a in world.ATTRIBUTES
        }
    passed = all(groups[g][a] >= BAR[g] for g in GROUPS for a in ("color", "shape"))
    return {
        "groups": groups,
        "bar": {g: {"color": BAR[g], "shape": BAR[g]} for g in GROUPS},
        "passed": passed,
        "eot_keyword_cosine": keyword_eot_cosine(pipe, seed=seed),
        "settings": {"steps": settings.steps, "guidance": settings.guidance, "seed": seed, "n": per_group * len(GROUPS)},
        "seconds": round(time.time() - t0, 1),
    }


def format_table(result: dict) -> str:
    lines = ["group              n    color  shape  pattern  background"]
    for g, row in result["groups"].items():
        lines.append(
            f"{g:<16} {row['n']:>4}   {row['color']:.3f}  {row['shape']:.3f}  {row['pattern']:.3f}    {row['background']:.3f}"
        )
    cos = result["eot_keyword_cosine"]
    lines.append(f"keyword/[EoT] colour-direction cosine: mean {cos['mean']:.2f} (red {cos.get('red', float('nan')):.2f})")
    lines.append(f"quality bar (colour and shape >= 0.90 keyword and every -open group, >= 0.85 synonym/paraphrase): "
                 f"{'PASSED' if result['passed'] else 'FAILED'} in {result['seconds']} s")
    return "\n".join(lines)
