"""ShapeWorld's components: the same diffusers/transformers classes as SD v1.x, miniature.

Sizes are chosen so that the whole world trains on 2 CPU cores in under two hours and ships in
under 25 MB (fp16), while the text encoder keeps enough width and depth that the [EoT] token and
the keyword tokens carry distinguishable directions (see `trce shapeworld check`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPConfig, CLIPModel

from trce.shapeworld.tokenizer import MAX_LENGTH
from trce.shapeworld.world import ATTRIBUTES, vocab

TEXT_WIDTH = 256
LATENT_SIZE = 8


def clip_model(tokenizer, seed: int = 0) -> CLIPModel:
    """A small CLIP (causal text transformer + ViT) trained contrastively on renders and captions."""
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_WIDTH,
            "intermediate_size": 4 * TEXT_WIDTH,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "max_position_embeddings": MAX_LENGTH,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "projection_dim": 128,
        },
        vision_config={
            "image_size": vocab().image_size,
            "patch_size": 4,
            "num_channels": 3,
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "projection_dim": 128,
        },
        projection_dim=128,
    )
    torch.manual_seed(seed)
    return CLIPModel(config)


def vae_model(seed: int = 0) -> AutoencoderKL:
    """32x32x3 -> 8x8x4 KL autoencoder (two downsamplings)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[32, 64, 64],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=vocab().image_size,
    )


def unet_model(seed: int = 0) -> UNet2DConditionModel:
    """Conditional UNet with cross-attention in down, mid and up blocks (8x8 -> 4x4 -> 2x2)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(48, 96, 96),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def scheduler() -> DDIMScheduler:
    """DDIM configured exactly like Stable Diffusion v1.x's."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


@dataclass(frozen=True)
class DetectorConfig:
    """Output heads of the attribute classifier, in `vocab.yaml` order."""

    classes: dict  # attribute -> list of values
    width: int = 32

    @classmethod
    def default(cls) -> DetectorConfig:
        return cls(classes={a: vocab().values(a) for a in ATTRIBUTES})

    def to_dict(self) -> dict:
        return asdict(self)


class AttributeClassifier(nn.Module):
    """Small CNN with one head per attribute; input (B, 3, 32, 32) in [0, 1]."""

    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.config = config
        w = config.width

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(3, w, 1), block(w, w, 1), block(w, 2 * w, 2), block(2 * w, 2 * w, 1), block(2 * w, 4 * w, 2),
            block(4 * w, 4 * w, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.heads = nn.ModuleDict({a: nn.Linear(4 * w, len(v)) for a, v in config.classes.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)  # (B, 4w)
        return {a: head(feats) for a, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, list[str]]:
        """Top-1 value per attribute for a batch of images in [0, 1]."""
        logits = self(images)
        return {a: [self.config.classes[a][i] for i in logits[a].argmax(-1).tolist()] for a in logits}
