"""Tiny random components for tests and smoke runs, in the spirit of diffusers' `get_dummy_components`.

Same classes and layout as SD v1.x and ShapeWorld (CLIP text encoder, UNet with cross-attention in
down/mid/up blocks, KL VAE, SD's DDIM), a few hundred thousand parameters, 32x32 images.
"""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_pipeline(seed: int = 0, text_width: int = 32, family: str = "sd1", prediction_type: str = "epsilon"):
    """A tiny random pipeline of a model family: `sd1` (ShapeWorld's layout) or `sd2` (padding "!", linear
    projections, `prediction_type` epsilon or v_prediction)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from trce.shapeworld.models import scheduler
    from trce.shapeworld.tokenizer import build_tokenizer

    tok = build_tokenizer()
    sd2 = family == "sd2"
    if sd2:
        tok.pad_token = "!"  # OpenCLIP pads with "!", not with end-of-text
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=text_width, intermediate_size=2 * text_width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, projection_dim=text_width,
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_width, attention_head_dim=4, norm_num_groups=32, use_linear_projection=sd2,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[16, 16, 16], layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32,
    )
    sched = scheduler()
    if prediction_type != "epsilon":
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config({**sched.config, "prediction_type": prediction_type})
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.trce_model_name = "tiny"
    return pipe


def tiny_pipeline_dir(folder: str | Path, seed: int = 0, **kwargs) -> Path:
    """Save a tiny pipeline as a diffusers folder (loadable with `--model FOLDER`); kwargs as `tiny_pipeline`."""
    folder = Path(folder)
    if not (folder / "model_index.json").exists():
        tiny_pipeline(seed, **kwargs).save_pretrained(folder, safe_serialization=True)
    return folder


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """A user mistake ended as the CLI promises: exit status 2 and one `trce: error:` line holding every needle."""
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("trce: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


class Killed(Exception):
    """Raised by `die_after_checkpoint`: the run stops as if killed right after writing a checkpoint."""


def die_after_checkpoint(monkeypatch, module, name: str = "save_state") -> None:
    """Make `module.<name>` (a training stage's checkpoint writer) save, then raise `Killed`; `monkeypatch.undo()`
    or a new `monkeypatch.setattr` restores it."""
    save = getattr(module, name)

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise Killed

    monkeypatch.setattr(module, name, save_then_die)


def tiny_sdxl_pipeline(seed: int = 0, widths: tuple[int, int] = (32, 32), pooled: int = 32):
    """A tiny random `StableDiffusionXLPipeline`: two CLIP text encoders (the second with a projection, padding
    "!"), a UNet reading their concatenated token states and the pooled embedding with size ids."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from trce.shapeworld.models import scheduler
    from trce.shapeworld.tokenizer import build_tokenizer

    tok, tok2 = build_tokenizer(), build_tokenizer()
    tok2.pad_token = "!"

    def text_config(tokenizer, width: int, projection: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, projection_dim=projection)

    torch.manual_seed(seed)
    text = CLIPTextModel(text_config(tok, widths[0], widths[0]))
    text2 = CLIPTextModelWithProjection(text_config(tok2, widths[1], pooled))
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=sum(widths), attention_head_dim=4, norm_num_groups=32, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled + 6 * time_dim,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[16, 16, 16], layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32,
    )
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text, text_encoder_2=text2, tokenizer=tok, tokenizer_2=tok2,
                                     unet=unet, scheduler=scheduler(), force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.trce_model_name = "tiny-sdxl"
    return pipe


def tiny_sd3_pipeline(seed: int = 0, widths: tuple[int, int] = (32, 32)):
    """A tiny random `StableDiffusion3Pipeline` without T5 (`text_encoder_3=None`, as SD3 allows): CLIP-L and
    CLIP-G stand-ins (with projections: the pooled vectors), a two-block MMDiT, flow matching."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from trce.shapeworld.tokenizer import build_tokenizer

    tok, tok2 = build_tokenizer(), build_tokenizer()
    tok2.pad_token = "!"

    def encoder(tokenizer, width: int) -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=width))

    torch.manual_seed(seed)
    text, text2 = encoder(tok, widths[0]), encoder(tok2, widths[1])
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=sum(widths), caption_projection_dim=16,
        pooled_projection_dim=sum(widths), pos_embed_max_size=16,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[16, 16, 16], layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32, shift_factor=0.0,
    )
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                    text_encoder=text, tokenizer=tok, text_encoder_2=text2, tokenizer_2=tok2,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.trce_model_name = "tiny-sd3"
    return pipe


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True, width: int = 32):
    """A tiny random `FluxPipeline` (dev-like with `guidance_embeds`, schnell-like without): a CLIP-L stand-in
    (pooled vector), a tiny T5 encoder (token states; the world's tokenizer stands in for T5's, which is not
    available offline), one joint and one single-stream block, flow matching with FLUX's dynamic shift."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from trce.shapeworld.tokenizer import build_tokenizer

    tok, tok2 = build_tokenizer(), build_tokenizer()
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tok.model_max_length, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, projection_dim=width))
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok2), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2,
                                 num_heads=2, pad_token_id=tok2.pad_token_id, eos_token_id=tok2.eos_token_id,
                                 decoder_start_token_id=tok2.pad_token_id)).eval()  # eval: no dropout, as loaded
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=width, pooled_projection_dim=width, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 2, 2),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[16, 16, 16], layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32, shift_factor=0.0, use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tok, text_encoder_2=t5,
                        tokenizer_2=tok2, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    pipe.trce_model_name = "tiny-flux"
    return pipe
