"""The numbers of an evaluation: rates with Wilson intervals, Fréchet distance, CLIP score, ESR/PSR.

The Fréchet distance is computed here and nowhere else (`frechet_distance`); FID is that
distance on Inception-v3 pool features, ShapeWorld's "fd" the same on the ShapeWorld CLIP vision
tower's image embeddings. Feature extractors return float64 numpy arrays (N, D).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from trce.errors import TrceError

log = logging.getLogger(__name__)

Z95 = 1.959963984540054  # two-sided 95% normal quantile


# --------------------------------------------------------------------------- rates
def wilson(k: int, n: int, z: float = Z95) -> list[float]:
    """Wilson score interval [lo, hi] for k successes in n trials (Wilson 1927).

    Unlike the normal approximation it stays inside [0, 1] and is not degenerate at k = 0 or n,
    which matters here: erased models often score 0 of a few hundred. n = 0 gives [0, 1].
    """
    if n <= 0:
        return [0.0, 1.0]
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n], got k={k}, n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact at the ends (rounding would leave 1 - 1e-16)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return [lo, hi]


def rate(flags: Sequence[bool], key: str = "asr") -> dict:
    """{"n", key, key_ci} for a list of booleans (the rate is None when the list is empty)."""
    n, k = len(flags), int(sum(bool(f) for f in flags))
    return {"n": n, key: (k / n if n else None), f"{key}_ci": wilson(k, n)}


def esr_psr(named: Sequence[str], predicted: Sequence[str], erased: Sequence[str]) -> dict:
    """Erasure and preservation success rates for a multi-value erasure (KPOP's ESR-1 / PSR-1).

    ESR: of the images whose prompt names an erased value, the fraction whose detector top-1 is
    *not* that value. PSR: of the images whose prompt names any other value, the fraction whose
    top-1 *is* the prompted value.
    """
    erased_set = set(erased)
    esr_flags = [p != v for v, p in zip(named, predicted) if v in erased_set]
    psr_flags = [p == v for v, p in zip(named, predicted) if v not in erased_set]
    esr, psr = rate(esr_flags, "esr"), rate(psr_flags, "psr")
    return {"esr": esr["esr"], "esr_ci": esr["esr_ci"], "esr_n": esr["n"],
            "psr": psr["psr"], "psr_ci": psr["psr_ci"], "psr_n": psr["n"]}


# --------------------------------------------------------------------------- Fréchet distance
def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {x.shape}")
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Dowson & Landau 1982):

        d^2 = |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}).

    As in Heusel et al.'s FID code, a singular product gets eps added to both diagonals, and the
    imaginary part that numerical error leaves in the matrix square root is dropped.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("the two distributions must have the same dimension")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            log.warning("Fréchet distance: imaginary part %.3g in the matrix square root", np.abs(covmean.imag).max())
        covmean = covmean.real
    return float(max(0.0, diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)))


def frechet_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (N, D) and (M, D)."""
    if len(a) <= a.shape[1] or len(b) <= b.shape[1]:
        log.debug("Fréchet distance on %d and %d samples of dimension %d: covariance is rank-deficient, "
                 "the value is biased upwards", len(a), len(b), a.shape[1])
    return frechet_distance(*feature_stats(a), *feature_stats(b))


# --------------------------------------------------------------------------- CLIP score
def clip_score(image_embeds: np.ndarray | torch.Tensor, text_embeds: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per-pair CLIP score, 100 * max(cos(image, text), 0) (Hessel et al. 2021, as in torchmetrics): (N,)."""
    a = torch.as_tensor(np.asarray(image_embeds), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(text_embeds), dtype=torch.float64)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)  # (N,)
    return (100 * cos.clamp(min=0)).numpy()


# --------------------------------------------------------------------------- feature extractors
def _batches(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(n, s + size))


@torch.no_grad()
def shapeworld_image_embeds(images: np.ndarray, vision=None, batch: int = 256) -> np.ndarray:
    """ShapeWorld CLIP vision tower `image_embeds` (N, 128) of uint8 (N, 32, 32, 3) images.

    Pixels are scaled to [-1, 1], as the tower saw them in training (trce.shapeworld.train).
    """
    from trce.shapeworld import clip_vision

    vision = vision if vision is not None else clip_vision()
    out = []
    for sl in _batches(len(images), batch):
        x = torch.from_numpy(images[sl]).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W)
        out.append(vision(pixel_values=x.to(vision.device)).image_embeds.double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, vision.config.projection_dim))


@torch.no_grad()
def shapeworld_text_embeds(prompts: Sequence[str], folder: str | Path | None = None, batch: int = 256) -> np.ndarray:
    """ShapeWorld CLIP text embeddings (N, 128): the original text encoder's pooled [EoT] output times
    `text_projection` (weights/clip_text_projection.safetensors).

    The text encoder is always the shipped one, so a patch that edits the text encoder does not
    change the yardstick.
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    from trce.shapeworld import weights_dir
    from trce.utils import io

    folder = Path(folder) if folder is not None else weights_dir()
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32).eval()
    proj = io.load_tensors(folder / "clip_text_projection.safetensors")["text_projection"].float()  # (P, D)
    out = []
    for sl in _batches(len(prompts), batch):
        ids = tok(list(prompts[sl]), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        pooled = text(ids).pooler_output.float()  # (B, D) at the first [EoT]
        out.append((pooled @ proj.T).double())  # (B, P)
    return torch.cat(out).numpy() if out else np.zeros((0, proj.shape[0]))


class RealClip:
    """A transformers CLIP from a local folder (`--clip-weights DIR`, e.g. openai/clip-vit-large-patch14)."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu"):
        from transformers import CLIPModel, CLIPTokenizer

        folder = Path(folder)
        if not (folder / "config.json").exists():
            raise TrceError(f"--clip-weights {folder} is not a transformers CLIP folder (no config.json)")
        try:
            self.model = CLIPModel.from_pretrained(folder, torch_dtype=torch.float32).to(device).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise TrceError(f"cannot load CLIP from {folder}: {str(exc).splitlines()[0]}") from exc
        pre = {}
        if (folder / "preprocessor_config.json").exists():
            pre = json.loads((folder / "preprocessor_config.json").read_text())
        size = pre.get("crop_size", self.model.config.vision_config.image_size)
        self.size = int(size["height"] if isinstance(size, dict) else size)
        self.mean = torch.tensor(pre.get("image_mean", [0.48145466, 0.4578275, 0.40821073])).view(1, 3, 1, 1)
        self.std = torch.tensor(pre.get("image_std", [0.26862954, 0.26130258, 0.27577711])).view(1, 3, 1, 1)

    def pixels(self, images: np.ndarray) -> torch.Tensor:
        """CLIP preprocessing: bicubic resize of the short side, centre crop, normalise: (B, 3, S, S)."""
        from PIL import Image

        out = []
        for img in images:
            pil = Image.fromarray(img)
            scale = self.size / min(pil.size)
            w, h = max(self.size, round(pil.width * scale)), max(self.size, round(pil.height * scale))
            pil = pil.resize((w, h), Image.BICUBIC)
            left, top = (w - self.size) // 2, (h - self.size) // 2
            pil = pil.crop((left, top, left + self.size, top + self.size))
            out.append(torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255)
        return (torch.stack(out) - self.mean) / self.std

    @torch.no_grad()
    def image_embeds(self, images: np.ndarray, batch: int = 32) -> np.ndarray:
        dev = self.model.device
        out = [self.model.get_image_features(pixel_values=self.pixels(images[sl]).to(dev)) for sl in
               _batches(len(images), batch)]
        return torch.cat([_embeds(o) for o in out]).double().cpu().numpy()

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str], batch: int = 64) -> np.ndarray:
        dev = self.model.device
        out = []
        for sl in _batches(len(prompts), batch):
            tok = self.tokenizer(list(prompts[sl]), padding=True, truncation=True, max_length=77, return_tensors="pt")
            out.append(_embeds(self.model.get_text_features(**tok.to(dev))))
        return torch.cat(out).double().cpu().numpy()


def _embeds(out) -> torch.Tensor:
    # transformers 5 may return a model output instead of a tensor from get_*_features
    if torch.is_tensor(out):
        return out
    return out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0]


class Inception:
    """Inception-v3 pool features (N, 2048) from a local TorchScript file (`--inception-weights FILE`).

    The file is the one StyleGAN2-ADA and clean-fid use, `inception-2015-12-05.pt` (a port of the
    TensorFlow FID network): it takes uint8-range images (B, 3, H, W), resizes them itself, and
    returns pool features with `return_features=True`. No other library is needed.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu"):
        path = Path(path)
        if not path.is_file():
            raise TrceError(f"--inception-weights {path} does not exist (expected inception-2015-12-05.pt)")
        import warnings

        try:
            with warnings.catch_warnings():  # torch marks jit.load deprecated; the FID network exists only as TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                self.model = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError) as exc:
            raise TrceError(f"{path} is not a TorchScript Inception network: {str(exc).splitlines()[0]}") from exc
        self.device = device

    @torch.no_grad()
    def features(self, images: np.ndarray, batch: int = 64) -> np.ndarray:
        out = []
        for sl in _batches(len(images), batch):
            x = torch.from_numpy(images[sl]).permute(0, 3, 1, 2).to(self.device)  # (B, 3, H, W) uint8
            out.append(self.model(x, return_features=True).double().cpu())
        return torch.cat(out).numpy()
