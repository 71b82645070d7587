"""One way to get a Stable Diffusion pipeline: `load_pipeline(model, device, dtype, patch)`.

`model` is one of
- `shapeworld`: the miniature SD shipped inside this package (no network, seconds);
- `sd14-arch`: the SD v1.4 architecture built from its configuration with random weights, for
  speed and memory benchmarks at real scale (seeded, so its fingerprint is stable);
- a local diffusers folder (with `model_index.json`);
- a hub id such as `CompVis/stable-diffusion-v1-4`, loaded with `from_pretrained` from the cache
  or the network.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from trce.errors import TrceError

log = logging.getLogger(__name__)

BUILTIN_MODELS = ("shapeworld", "shapeworld-xl", "shapeworld-dit", "sd14-arch", "sd2-arch", "sdxl-arch", "sd3-arch")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise TrceError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrceError(f"device {device!r} asked for, but no CUDA GPU is available; use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp16 on a GPU and fp32 on the CPU unless forced (half precision is slow and lossy on CPUs)."""
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise TrceError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16")
    return DTYPES[dtype]


def load_pipeline(
    model: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    patch=None,
):
    """Load `model` as a plain diffusers pipeline (`StableDiffusionPipeline` for SD 1.x) on `device` in `dtype`.

    With `patch` (a patch folder or an `Edit`), the erasure is applied after loading; a patch made
    for another base model is refused. The applied Edit stays reachable as `pipe.trce_patch`
    (`pipe.trce_patch.revert(pipe)` gives back the base model, bit for bit).
    """
    from trce.edit import as_edit

    if not isinstance(model, (str, os.PathLike)):
        raise TrceError(f"model must be a built-in model name, a diffusers folder or a hub id, got {model!r}",
                        field="model")
    model = os.fspath(model)
    edit = as_edit(patch, "patch")  # a bad patch is refused before the model loads
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if model == "shapeworld":
        from trce.shapeworld import weights_dir

        pipe = _from_folder(weights_dir(), dt, name="shapeworld")
    elif model in ("shapeworld-xl", "shapeworld-dit"):
        from trce.shapeworld.pipelines import load_miniature

        pipe = load_miniature(model, dt)
    elif model == "sd14-arch":
        pipe = sd14_arch_pipeline(dt)
    elif model == "sd2-arch":
        pipe = sd2_arch_pipeline(dt)
    elif model == "sdxl-arch":
        pipe = sdxl_arch_pipeline(dt)
    elif model == "sd3-arch":
        pipe = sd3_arch_pipeline(dt)
    elif Path(model).expanduser().exists():
        pipe = _from_folder(Path(model).expanduser(), dt, name=model)
    elif _HUB_ID.match(model):
        pipe = _from_hub(model, dt)
    else:
        import difflib

        close = difflib.get_close_matches(model, BUILTIN_MODELS, n=1)
        raise TrceError(
            f"unknown model {model!r}{f' (did you mean {close[0]!r}?)' if close else ''}: not a built-in "
            f"({', '.join(BUILTIN_MODELS)}), not an existing folder, and not a hub id of the form owner/name"
        )
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(dev)
    pipe.trce_model_name = model  # recorded in every output made with this pipeline
    pipe.trce_patch = None
    if edit is not None:
        edit.apply(pipe)
        pipe.trce_patch = edit
    return pipe


def _from_folder(folder: Path, dtype: torch.dtype, name: str):
    import diffusers

    from trce.families import family_for_class

    if not (folder / "model_index.json").exists():
        if name == "shapeworld":
            raise TrceError(
                f"the ShapeWorld weights are missing from this install ({folder}); "
                "rebuild them with `trce shapeworld train --out DIR --ship`"
            )
        raise TrceError(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    index = _read_json(folder / "model_index.json")
    class_name = str(index.get("_class_name", "")) if isinstance(index, dict) else ""
    family = family_for_class(class_name)  # an architecture trce has no family for is refused here
    cls = getattr(diffusers, class_name)
    # components saved as absent (SD3 without T5, no safety checker) are passed as None
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}
    try:
        pipe = cls.from_pretrained(folder, dtype=dtype, use_safetensors=True, local_files_only=True,
                                   **{**absent, **family.load_kwargs})
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise TrceError(f"cannot load the pipeline in {folder}: {str(exc).splitlines()[0]}") from exc
    return pipe


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrceError(f"cannot read {path}: {str(exc).splitlines()[0]}") from exc


def _from_hub(model_id: str, dtype: torch.dtype):
    from diffusers import DiffusionPipeline

    from trce.families import family_of

    try:
        pipe = DiffusionPipeline.from_pretrained(model_id, dtype=dtype, safety_checker=None,
                                                 requires_safety_checker=False)
    except Exception as exc:  # hub errors come as many types (OSError, HTTP, connection, offline mode)
        raise TrceError(
            f"cannot load {model_id!r} from the Hugging Face hub or its cache ({type(exc).__name__}); "
            "pass a local diffusers folder instead, or download it once and set HF_HUB_OFFLINE=1 to use the cache"
        ) from exc
    family_of(pipe)  # an architecture trce has no family for is refused here
    return pipe


# --------------------------------------------------------------------------- SD v1.4 architecture
SD14_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
}
SD14_TEXT: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2,
    "pad_token_id": 1,
}
SD14_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 512,
    "norm_num_groups": 32, "scaling_factor": 0.18215,
}


def sd14_arch_pipeline(dtype: torch.dtype = torch.float32, seed: int = 0):
    """SD v1.4's UNet, CLIP ViT-L/14 text encoder, VAE and DDIM, built from config with random weights.

    The real CLIP BPE vocabulary cannot be downloaded here, so the tokenizer is ShapeWorld's BPE
    padded to 77 tokens; its ids are valid for the 49408-row embedding. Timing and memory do not
    depend on weight values.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trce.shapeworld.models import scheduler
    from trce.shapeworld.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 77
    text_cfg = dict(SD14_TEXT, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD14_UNET)
    text = CLIPTextModel(CLIPTextConfig(**text_cfg))
    vae = AutoencoderKL(**SD14_VAE)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    return pipe.to(dtype=dtype)


# --------------------------------------------------------------------------- SD 2.1 architecture (768-v)
SD21_UNET: dict[str, Any] = {
    **SD14_UNET, "sample_size": 96, "cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True, "upcast_attention": True,
}
SD21_TEXT: dict[str, Any] = {
    **SD14_TEXT, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
    "hidden_act": "gelu", "projection_dim": 512,
}


def sd2_arch_pipeline(dtype: torch.dtype = torch.float32, seed: int = 0):
    """SD 2.1's UNet (768-v: v-prediction, 96x96 latents), OpenCLIP ViT-H text encoder (as `CLIPTextModel`, 1024-d,
    23 layers), VAE and DDIM, built from config with random weights. The tokenizer is ShapeWorld's BPE padded to
    77 tokens with "!", as OpenCLIP's tokenizer pads."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trce.shapeworld.models import scheduler
    from trce.shapeworld.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 77
    tokenizer.pad_token = "!"
    text_cfg = dict(SD21_TEXT, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                    pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD21_UNET)
    text = CLIPTextModel(CLIPTextConfig(**text_cfg))
    vae = AutoencoderKL(**SD14_VAE)
    sched = DDIMScheduler.from_config({**scheduler().config, "prediction_type": "v_prediction"})
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=sched, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    return pipe.to(dtype=dtype)


def _two_tokenizers():
    """The SDXL / SD3 tokenizer pair of the random-weight architectures (ShapeWorld's BPE at 77 tokens; the
    second pads with "!" as OpenCLIP bigG does) and the special-token ids both text configs need."""
    from trce.shapeworld.tokenizer import build_tokenizer

    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer()
    for tok in (tokenizer, tokenizer_2):
        tok.model_max_length = 77
    tokenizer_2.pad_token = "!"
    return tokenizer, tokenizer_2, {"eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}


# --------------------------------------------------------------------------- SDXL base 1.0 architecture
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
    "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32,
}
SDXL_TEXT2: dict[str, Any] = {  # OpenCLIP ViT-bigG/14's text tower
    **SD14_TEXT, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
    "hidden_act": "gelu", "projection_dim": 1280,
}


def sdxl_arch_pipeline(dtype: torch.dtype = torch.float32, seed: int = 0):
    """SDXL base 1.0's UNet (about 2.57 B parameters), CLIP ViT-L and OpenCLIP ViT-bigG text encoders (the second
    with its projection: the pooled embedding), VAE and DDIM, built from config with random weights (about 14 GB
    in fp32). Tokenizers: ShapeWorld's BPE padded to 77 tokens, the second with "!"."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trce.shapeworld.models import scheduler

    tokenizer, tokenizer_2, ids = _two_tokenizers()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SDXL_UNET)
    text = CLIPTextModel(CLIPTextConfig(**{**SD14_TEXT, **ids, "pad_token_id": tokenizer.pad_token_id}))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**SDXL_TEXT2, **ids, "pad_token_id": tokenizer_2.pad_token_id}))
    vae = AutoencoderKL(**{**SD14_VAE, "sample_size": 1024, "scaling_factor": 0.13025})
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler(),
                                     force_zeros_for_empty_prompt=True)
    return pipe.to(dtype=dtype)


# --------------------------------------------------------------------------- SD 3.5 medium architecture
SD35M_TRANSFORMER: dict[str, Any] = {  # MMDiT-X: joint blocks, dual attention in the first 13, RMS q/k norms
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
    "dual_attention_layers": tuple(range(13)),
}
SD3_VAE: dict[str, Any] = {
    **SD14_VAE, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
    "use_quant_conv": False, "use_post_quant_conv": False,
}


def sd3_arch_pipeline(dtype: torch.dtype = torch.float32, seed: int = 0):
    """SD 3.5 medium's MMDiT-X transformer, CLIP ViT-L and OpenCLIP ViT-bigG text encoders (with projections: the
    pooled vectors), its 16-channel VAE and the flow-matching Euler scheduler, built from config with random
    weights. T5-XXL (4.7 B parameters, 19 GB in fp32) is left out as SD3 allows (`text_encoder_3=None`): it does not
    fit beside the rest on a 24 GB machine, and stage T's cost is measured on the CLIP rows it edits."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer, tokenizer_2, ids = _two_tokenizers()
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**SD35M_TRANSFORMER)
    text = CLIPTextModelWithProjection(CLIPTextConfig(**{**SD14_TEXT, **ids, "pad_token_id": tokenizer.pad_token_id}))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**SDXL_TEXT2, **ids, "pad_token_id": tokenizer_2.pad_token_id}))
    vae = AutoencoderKL(**SD3_VAE)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=text, tokenizer=tokenizer, text_encoder_2=text_2,
                                    tokenizer_2=tokenizer_2, text_encoder_3=None, tokenizer_3=None)
    return pipe.to(dtype=dtype)


def parameter_counts(pipe) -> dict[str, int]:
    """Parameters per torch component of the pipeline (denoiser, text encoders, VAE)."""
    from trce.families import family_of

    return {name: sum(p.numel() for p in module.parameters())
            for name, module in family_of(pipe).components(pipe).items()}


def describe(pipe) -> dict:
    """What `trce info` prints: components and parameter counts, device, dtype, the family's facts, fingerprint."""
    from trce.edit import fingerprint
    from trce.families import family_of

    family = family_of(pipe)
    counts = parameter_counts(pipe)
    return {
        "model": getattr(pipe, "trce_model_name", None),
        "family": family.name,
        "device": str(pipe.device),
        "dtype": str(family.denoiser(pipe).dtype).replace("torch.", ""),
        "parameters": counts,
        "parameters_total": sum(counts.values()),
        **family.info(pipe),
        "fingerprint": fingerprint(pipe)["id"],
    }
