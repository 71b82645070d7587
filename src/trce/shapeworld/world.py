"""ShapeWorld: a procedural world of one coloured, patterned shape on a background.

Everything here is deterministic from a seed: `sample_scene(rng)` draws a scene, `render(scene)`
paints it as a 32x32 RGB image, and `Captioner` writes a caption for it from the vocabulary in
`vocab.yaml` (keywords, synonyms and paraphrases, split into `spec` and `heldout` groups).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import numpy as np
import yaml

ATTRIBUTES = ("shape", "color", "pattern", "background")
Form = Literal["keyword", "synonym", "paraphrase"]
Group = Literal["spec", "heldout", "all"]
FORMS: tuple[str, ...] = ("keyword", "synonym", "paraphrase")
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Vocab:
    """The parsed `vocab.yaml`: values per attribute and every expression that names them."""

    raw: dict

    @property
    def image_size(self) -> int:
        return int(self.raw["image_size"])

    def values(self, attribute: str) -> list[str]:
        return list(self.raw[_section(attribute)])

    def rgb(self, attribute: str, value: str) -> tuple[int, int, int]:
        return tuple(self.raw[_section(attribute)][value]["rgb"])  # type: ignore[return-value]

    def expressions(self, attribute: str, value: str, form: str, group: str = "all") -> list[str]:
        """Words or phrases naming `value` in the given form (`keyword`, `synonym`, `paraphrase`)."""
        if form == "keyword":
            return [value]
        entry = self.raw[_section(attribute)][value]
        items = entry["synonyms" if form == "synonym" else "paraphrases"]
        if isinstance(items, list):  # backgrounds have no spec/heldout split
            return list(items)
        if group == "all":
            return list(items["spec"]) + list(items["heldout"])
        return list(items[group])

    @property
    def templates(self) -> list[str]:
        return list(self.raw["templates"])

    def all_text(self) -> list[str]:
        """Every string the world can put in a caption (for building the tokenizer)."""
        out = list(self.templates)
        for attribute in ATTRIBUTES:
            for value in self.values(attribute):
                for form in FORMS:
                    out.extend(self.expressions(attribute, value, form))
        return out


def _section(attribute: str) -> str:
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown ShapeWorld attribute {attribute!r}; choose one of {ATTRIBUTES}")
    return {"shape": "shapes", "color": "colors", "pattern": "patterns", "background": "backgrounds"}[
        attribute
    ]


@functools.cache
def vocab() -> Vocab:
    text = resources.files("trce.shapeworld").joinpath("vocab.yaml").read_text()
    return Vocab(yaml.safe_load(text))


def attribute_values(text: str, field: str, *, several: bool = True) -> tuple[str, tuple[str, ...]]:
    """"color=red,pink" -> ("color", ("red", "pink")): a ShapeWorld attribute and values of it, each checked against the
    vocabulary (a close match named on a typo); a malformed `text` is a TrceError naming the setting `field`
    (`several=False`: exactly one value)."""
    from trce.errors import TrceError, choose

    attribute, sep, values = str(text).partition("=")
    vals = tuple(v.strip() for v in values.split(",") if v.strip())
    if not sep or not vals or (len(vals) > 1 and not several):
        form = "attribute=value[,value]" if several else "attribute=value"
        raise TrceError(f"{field} must look like {form} (e.g. color=red), got {text!r}", field=field)
    attribute = attribute.strip()
    choose("ShapeWorld attribute", attribute, ATTRIBUTES)
    for v in vals:
        choose(f"{attribute} value", v, vocab().values(attribute))
    return attribute, vals


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    pattern: str
    background: str
    radius: float  # in pixels
    cx: float
    cy: float
    tint: tuple[int, int, int]  # small per-image colour jitter, so colours are ranges, not points

    def attribute(self, name: str) -> str:
        return getattr(self, name)


def sample_scene(rng: np.random.Generator, **fixed: str) -> Scene:
    """Draw a random scene; keyword arguments pin attributes (e.g. `color="red"`)."""
    v = vocab()
    chosen = {}
    for attribute in ATTRIBUTES:
        values = v.values(attribute)
        pick = values[int(rng.integers(len(values)))]
        chosen[attribute] = fixed.get(attribute, pick)
        if chosen[attribute] not in values:
            raise ValueError(f"unknown {attribute} {chosen[attribute]!r}; choose one of {values}")
    size = v.image_size
    radius = float(rng.uniform(0.22, 0.42) * size)
    margin = radius + 1.0
    cx = float(rng.uniform(margin, size - margin))
    cy = float(rng.uniform(margin, size - margin))
    tint = tuple(int(t) for t in rng.integers(-14, 15, size=3))
    return Scene(radius=radius, cx=cx, cy=cy, tint=tint, **chosen)  # type: ignore[arg-type]


def _polygon(n_points: int, inner: float | None, phase: float) -> np.ndarray:
    """Vertices of a regular polygon (or a star when `inner` is set), unit outer radius."""
    count = n_points * 2 if inner is not None else n_points
    angles = phase + np.arange(count) * (2 * np.pi / count)
    radii = np.ones(count)
    if inner is not None:
        radii[1::2] = inner
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _inside_polygon(x: np.ndarray, y: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd ray casting, vectorised over points."""
    inside = np.zeros(x.shape, dtype=bool)
    x0, y0 = poly[-1]
    for x1, y1 in poly:
        crosses = (y1 > y) != (y0 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = (x0 - x1) * (y - y1) / (y0 - y1) + x1
        inside ^= crosses & (x < xint)
        x0, y0 = x1, y1
    return inside


_UP = -np.pi / 2  # image y grows downwards, so -90 degrees points up
_POLYGONS = {
    "triangle": _polygon(3, None, _UP) * np.array([1.0, 1.0]) + np.array([0.0, 0.18]),
    "star": _polygon(5, 0.45, _UP),
    "diamond": _polygon(4, None, _UP),
    "square": np.array([[-0.78, -0.78], [0.78, -0.78], [0.78, 0.78], [-0.78, 0.78]]),
}


def shape_mask(shape: str, u: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Boolean mask of `shape` in unit coordinates (u right, w down, radius 1)."""
    if shape == "circle":
        return u**2 + w**2 <= 0.85**2
    if shape == "cross":
        arm = 0.3
        return ((np.abs(u) <= arm) & (np.abs(w) <= 0.95)) | ((np.abs(w) <= arm) & (np.abs(u) <= 0.95))
    if shape in _POLYGONS:
        return _inside_polygon(u, w, _POLYGONS[shape])
    raise ValueError(f"unknown shape {shape!r}")


def _pattern_mask(pattern: str, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Where the darker pattern shade goes, in pixel coordinates (aligned to a 4-pixel grid)."""
    if pattern == "solid":
        return np.zeros(px.shape, dtype=bool)
    if pattern == "striped":
        return np.floor(py) % 4 >= 2
    if pattern == "dotted":
        return (np.floor(px) % 4 >= 2) & (np.floor(py) % 4 >= 2)
    raise ValueError(f"unknown pattern {pattern!r}")


def render(scene: Scene) -> np.ndarray:
    """Paint a scene: (H, W, 3) uint8, anti-aliased by supersampling."""
    v = vocab()
    size = v.image_size
    n = size * _SUPERSAMPLE
    # (n, n) sample positions at sub-pixel centres, in pixel units
    py, px = (np.mgrid[0:n, 0:n] + 0.5) / _SUPERSAMPLE
    u = (px - scene.cx) / scene.radius
    w = (py - scene.cy) / scene.radius
    inside = shape_mask(scene.shape, u, w)
    fg = np.clip(np.array(v.rgb("color", scene.color)) + np.array(scene.tint), 0, 255)
    shade = fg * 0.4
    bg = np.array(v.rgb("background", scene.background), dtype=np.float64)
    img = np.broadcast_to(bg, (n, n, 3)).copy()
    img[inside] = fg
    dark = inside & _pattern_mask(scene.pattern, px, py)
    img[dark] = shade
    # (n, n, 3) -> (size, size, 3) by averaging each supersampled block
    img = img.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class CaptionStyle:
    """How a caption names each attribute.

    `forms` maps attribute -> probabilities of keyword/synonym/paraphrase; `mention` maps attribute
    -> probability that it is named at all; `group` restricts synonyms/paraphrases to the `spec`
    or `heldout` expressions (or `all`).
    """

    forms: dict
    mention: dict
    group: str = "all"


TRAIN_STYLE = CaptionStyle(
    forms={
        "color": (0.4, 0.35, 0.25),
        "shape": (0.4, 0.35, 0.25),
        "pattern": (0.4, 0.35, 0.25),
        "background": (0.6, 0.3, 0.1),
    },
    mention={"color": 0.92, "shape": 0.95, "pattern": 0.7, "background": 0.7},
)


def fixed_style(form: str, group: str = "heldout") -> CaptionStyle:
    """Every attribute named, colour/shape/pattern in `form`, background by keyword."""
    probs = tuple(1.0 if f == form else 0.0 for f in FORMS)
    return CaptionStyle(
        forms={"color": probs, "shape": probs, "pattern": probs, "background": (1.0, 0.0, 0.0)},
        mention={a: 1.0 for a in ATTRIBUTES},
        group=group,
    )


def article(word: str) -> str:
    """The indefinite article before `word`."""
    return "an" if word[:1] in "aeiou" else "a"


def _pick(rng: np.random.Generator, items: list[str]) -> str:
    return items[int(rng.integers(len(items)))]


def noun_phrase(scene: Scene, rng: np.random.Generator, style: CaptionStyle) -> tuple[str, str | None, tuple[str, ...]]:
    """(noun phrase, background expression or None, attributes named) for a scene."""
    v = vocab()
    words: dict[str, tuple[str, str] | None] = {}
    for attribute in ATTRIBUTES:
        if rng.random() >= style.mention[attribute]:
            words[attribute] = None
            continue
        form = FORMS[int(rng.choice(3, p=np.asarray(style.forms[attribute]) / sum(style.forms[attribute])))]
        group = "all" if form == "keyword" else style.group
        expr = _pick(rng, v.expressions(attribute, scene.attribute(attribute), form, group))
        words[attribute] = (form, expr)

    def pre(attribute: str) -> list[str]:
        item = words[attribute]
        return [item[1]] if item and item[0] != "paraphrase" else []

    def post(attribute: str) -> list[str]:
        item = words[attribute]
        return [item[1]] if item and item[0] == "paraphrase" else []

    shape = words["shape"][1] if words["shape"] else "shape"
    parts = pre("pattern") + pre("color") + [shape] + post("color") + post("pattern")
    bg = words["background"][1] if words["background"] else None
    named = tuple(a for a in ATTRIBUTES if words[a] is not None)
    return " ".join(parts), bg, named


def describe(
    scene: Scene, rng: np.random.Generator, style: CaptionStyle = TRAIN_STYLE, template: str | None = None
) -> tuple[str, tuple[str, ...]]:
    """(caption, attributes it names) for `scene`, drawn with `style`."""
    v = vocab()
    np_text, bg, named = noun_phrase(scene, rng, style)
    if template is None:
        candidates = v.templates if bg is not None else [t for t in v.templates if "{bg}" not in t]
        template = _pick(rng, candidates)
    if bg is None and "{bg}" in template:
        bg = scene.background  # a template forced with {bg}: name the background by keyword
        named = named + ("background",)
    text = template.format(np=np_text, bg=bg, a=article(np_text), a_bg=article(bg or ""))
    return re.sub(r"\s+", " ", text).strip(), named


def caption(scene: Scene, rng: np.random.Generator, style: CaptionStyle = TRAIN_STYLE, template: str | None = None) -> str:
    """A caption for `scene`, drawn with `style`."""
    return describe(scene, rng, style, template)[0]
