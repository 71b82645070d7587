"""The ShapeWorld miniatures of the other model families as pipelines: ShapeWorld-XL (a `StableDiffusionXLPipeline`)
and ShapeWorld-DiT (a `StableDiffusion3Pipeline`), each a shipped denoiser assembled with the shipped ShapeWorld
parts (`load_miniature`, what `trce.load_pipeline("shapeworld-xl" | "shapeworld-dit")` gives). How they are
trained, and why each part is reused, is `trce.shapeworld.miniatures`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from trce.errors import TrceError
from trce.utils import io

MINIATURES = {"sdxl": ("shapeworld-xl", "weights-xl", "unet"), "sd3": ("shapeworld-dit", "weights-dit", "transformer")}
NAMES = {name: family for family, (name, _, _) in MINIATURES.items()}


def miniature_dir(family: str) -> Path:
    """Folder of the shipped miniature denoiser of `family` (sdxl, sd3), inside the installed package."""
    from importlib import resources

    return Path(str(resources.files("trce.shapeworld").joinpath(MINIATURES[family][1])))


# --------------------------------------------------------------------------- components
def text_encoder(base: Path, projection: bool, dtype=torch.float32):
    """ShapeWorld's CLIP text tower from an exported pipeline folder; with `projection`, as a
    `CLIPTextModelWithProjection` carrying the trained text projection (its `text_embeds`: the pooled vector)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    text = CLIPTextModel.from_pretrained(base / "text_encoder", dtype=torch.float32)
    if not projection:
        return text.to(dtype)
    model = CLIPTextModelWithProjection(text.config)
    model.text_model.load_state_dict(text.state_dict())  # CLIPTextModel holds the text transformer's parts
    proj = io.load_tensors(base / "clip_text_projection.safetensors")["text_projection"].float()
    with torch.no_grad():
        model.text_projection.weight.copy_(proj)
    return model.eval().to(dtype)


def denoiser_model(family: str, seed: int = 0):
    """The miniature's denoiser, about the size of ShapeWorld's UNet."""
    torch.manual_seed(seed)
    if family == "sdxl":
        from diffusers import UNet2DConditionModel

        time_dim = 16
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(48, 96, 96),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=512, attention_head_dim=8, norm_num_groups=16, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=128 + 6 * time_dim,
        )
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=6, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=512, caption_projection_dim=128, pooled_projection_dim=256,
        pos_embed_max_size=8,
    )


def flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=1.0)  # 8x8 latents: no resolution shift


def assemble(family: str, denoiser, base: Path, dtype=torch.float32):
    """The miniature's diffusers pipeline: `denoiser` with the ShapeWorld parts of the exported folder `base`."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(base / "tokenizer")
    vae = AutoencoderKL.from_pretrained(base / "vae", dtype=torch.float32)
    if family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        from trce.shapeworld.models import scheduler

        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder(base, False), text_encoder_2=text_encoder(base, True), tokenizer=tok,
            tokenizer_2=CLIPTokenizer.from_pretrained(base / "tokenizer"), unet=denoiser, scheduler=scheduler(),
            force_zeros_for_empty_prompt=True)
    else:
        from diffusers import StableDiffusion3Pipeline

        vae.register_to_config(shift_factor=0.0)
        pipe = StableDiffusion3Pipeline(
            transformer=denoiser, scheduler=flow_scheduler(), vae=vae, text_encoder=text_encoder(base, True),
            tokenizer=tok, text_encoder_2=text_encoder(base, True),
            tokenizer_2=CLIPTokenizer.from_pretrained(base / "tokenizer"), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def load_miniature(name: str, dtype=torch.float32, folder: Path | None = None):
    """`trce.load_pipeline("shapeworld-xl" | "shapeworld-dit")`: the shipped denoiser with the shipped parts."""
    from trce.shapeworld import weights_dir

    family = NAMES[name]
    folder = folder or miniature_dir(family)
    sub = folder / MINIATURES[family][2]
    if not (sub / "config.json").exists():
        raise TrceError(f"the {name} weights are missing from this install ({folder}); build them with "
                        f"`trce shapeworld train --family {family} --out DIR --ship`")
    cls = _denoiser_class(family)
    denoiser = cls.from_pretrained(sub, dtype=torch.float32, use_safetensors=True, local_files_only=True)
    pipe = assemble(family, denoiser, weights_dir(), dtype)
    pipe.trce_model_name = name
    return pipe


def _denoiser_class(family: str):
    import diffusers

    return getattr(diffusers, "UNet2DConditionModel" if family == "sdxl" else "SD3Transformer2DModel")
