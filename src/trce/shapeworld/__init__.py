"""ShapeWorld: the miniature Stable Diffusion that trce trains and ships, and its tools.

`trce.load_pipeline("shapeworld")` gives the pipeline; `detector()` the attribute classifier;
`clip_vision()` the tiny CLIP's vision tower (for CLIP score and Frechet features).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["clip_vision", "detector", "weights_dir"]


def weights_dir() -> Path:
    """Folder of the shipped ShapeWorld pipeline, inside the installed package."""
    from importlib import resources

    return Path(str(resources.files("trce.shapeworld").joinpath("weights")))


def detector(folder: str | Path | None = None, device: str = "cpu"):
    """The shipped attribute classifier (shape, color, pattern, background), in eval mode."""
    from trce.errors import TrceError
    from trce.shapeworld.models import AttributeClassifier, DetectorConfig
    from trce.utils import io

    folder = Path(folder) if folder is not None else weights_dir() / "detector"
    if not (folder / "detector.json").exists():
        raise TrceError(f"no ShapeWorld detector in {folder}; rebuild it with `trce shapeworld train --out DIR --ship`")
    meta = io.read_json(folder / "detector.json")
    model = AttributeClassifier(DetectorConfig(**meta["config"]))
    model.load_state_dict(io.load_tensors(folder / "detector.safetensors"))
    return model.to(device).eval()


def clip_vision(folder: str | Path | None = None, device: str = "cpu"):
    """The tiny CLIP's vision tower with its projection (`CLIPVisionModelWithProjection`), fp32."""
    import torch
    from transformers import CLIPVisionModelWithProjection

    folder = Path(folder) if folder is not None else weights_dir()
    return CLIPVisionModelWithProjection.from_pretrained(folder / "clip_vision", dtype=torch.float32).to(device).eval()
