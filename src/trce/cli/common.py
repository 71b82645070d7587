"""What the `trce` commands share: help formatting, the model flags, the image flags, reading a YAML run file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from trce.errors import TrceError

EXAMPLES = """examples:
  trce demo                                   # erase, evaluate and report on ShapeWorld (the quick start)
  trce info --model sd14-arch                 # parameter counts of SD v1.4's architecture, no download
  trce generate --model shapeworld --prompt "a crimson star on a black background" --seed 0 --out x.png
  trce erase --concept shapeworld-red --out runs/red      # TRCE (T then V); `trce methods` lists the others
  trce shapeworld check --n 600 --json        # the ShapeWorld quality bar
  trce shapeworld train --out runs/sw         # rebuild every ShapeWorld component from scratch
"""


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def parser_kwargs(help_text: str, examples: str) -> dict:
    return {"help": help_text, "description": help_text, "epilog": "examples:\n" + examples, "formatter_class": Formatter}


def add_model_args(p: argparse.ArgumentParser, default: str | None = "shapeworld") -> None:
    p.add_argument("--model", default=default, required=default is None,
                   help="shapeworld, shapeworld-xl, shapeworld-dit, sd14-arch, sd2-arch, sdxl-arch, sd3-arch, a local "
                        "diffusers folder, or a hub id such as CompVis/stable-diffusion-v1-4")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 on GPU, fp32 on CPU")


def add_image_args(p: argparse.ArgumentParser) -> None:
    """How images are made and judged: the flags `trce eval` and `trce attack` share."""
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the suite's, 30)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance for every prompt (default: the prompt file's per-prompt guidance, else the suite's)")
    p.add_argument("--size", type=int, default=None,
                   help="image height and width, a multiple of 8 up to 2048 (default: the model's)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images judged and recorded together (default: the suite's); images do not depend on it")
    p.add_argument("--detector", default=None, help="nudenet, shapeworld, q16 or none (default: the suite's)")
    p.add_argument("--threshold", type=float, default=None, help="detector threshold (nudenet: 0.45)")


def image_options(args) -> dict[str, Any]:
    """The `add_image_args` flags as `trce.eval.options.ImageOptions` fields."""
    from dataclasses import fields

    from trce.eval.options import ImageOptions

    return {f.name: getattr(args, f.name) for f in fields(ImageOptions)}


def flag(field: str, renamed: dict[str, str] | None = None) -> str:
    """The command-line flag of a library field: `batch_size` -> `--batch-size` (unless `renamed` says otherwise)."""
    return (renamed or {}).get(field) or "--" + field.replace("_", "-")


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping (a `--config` run file), read safely; errors name the file."""
    import yaml

    file = Path(path).expanduser()
    if not file.exists():
        raise TrceError(f"{what} {file} does not exist")
    if file.is_dir():
        raise TrceError(f"{what} {file} is a folder; give a YAML file")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise TrceError(f"{what} {file} is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise TrceError(f"{what} {file} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(raw, dict):
        raise TrceError(f"{what} {file} must hold a mapping of settings, got {type(raw).__name__}")
    return raw
