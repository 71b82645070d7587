import pytest
import torch

from trce.edit import fingerprint, same_base
from trce.errors import TrceError
from trce.loading import load_pipeline, resolve_dtype


def test_local_folder_loads_as_a_stable_diffusion_pipeline(tiny_dir):
    from diffusers import StableDiffusionPipeline

    pipe = load_pipeline(str(tiny_dir), device="cpu")
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.unet.dtype == torch.float32


def test_dtype_can_be_forced_and_fingerprint_survives_it(tiny_dir):
    a = load_pipeline(str(tiny_dir), device="cpu")
    b = load_pipeline(str(tiny_dir), device="cpu", dtype="bf16")
    assert b.unet.dtype == torch.bfloat16
    assert same_base(fingerprint(a), fingerprint(b))


def test_fingerprint_tells_models_apart(tiny_pipe):
    from trce.testing import tiny_pipeline

    other = tiny_pipeline(seed=1)
    assert not same_base(fingerprint(tiny_pipe), fingerprint(other))


@pytest.mark.parametrize("bad", ["nope", "./no/such/folder", "not a model"])
def test_unknown_model_is_one_clear_error(bad):
    with pytest.raises(TrceError, match="unknown model"):
        load_pipeline(bad)


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(TrceError, match="not a diffusers pipeline folder"):
        load_pipeline(str(tmp_path))


def test_offline_hub_id_names_the_id_and_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TrceError, match="owner-that-does-not-exist/model.*local diffusers folder.*HF_HUB_OFFLINE"):
        load_pipeline("owner-that-does-not-exist/model")


def test_dtype_and_device_choices():
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.float16
    with pytest.raises(TrceError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_shipped_shapeworld_loads_quickly_offline():
    pipe = load_pipeline("shapeworld", device="cpu")
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.tokenizer.pad_token_id == pipe.tokenizer.eos_token_id
    kinds = {type(b).__name__ for b in pipe.unet.down_blocks} | {type(pipe.unet.mid_block).__name__}
    assert "CrossAttnDownBlock2D" in kinds and "UNetMidBlock2DCrossAttn" in kinds
    assert any("CrossAttn" in type(b).__name__ for b in pipe.unet.up_blocks)


@pytest.mark.slow
def test_sd14_arch_has_sd14_parameter_counts():
    from trce.loading import parameter_counts

    pipe = load_pipeline("sd14-arch", device="cpu")
    counts = parameter_counts(pipe)
    assert abs(counts["unet"] - 859.52e6) < 1e6
    assert abs(counts["text_encoder"] - 123.06e6) < 1e6


@pytest.mark.slow
def test_sd2_arch_has_sd21_parameter_counts_and_is_the_sd2_family():
    from trce.families import family_of
    from trce.loading import parameter_counts

    pipe = load_pipeline("sd2-arch", device="cpu")
    counts = parameter_counts(pipe)
    assert abs(counts["unet"] - 865.91e6) < 1e6  # SD 2.1's UNet
    assert abs(counts["text_encoder"] - 340.39e6) < 1e6  # OpenCLIP ViT-H/14's text tower, 23 layers as SD 2 uses it
    assert family_of(pipe).name == "sd2" and pipe.scheduler.config.prediction_type == "v_prediction"


@pytest.mark.slow
def test_sdxl_arch_has_sdxl_base_parameter_counts_and_is_the_sdxl_family():
    from trce.families import family_of
    from trce.loading import parameter_counts

    pipe = load_pipeline("sdxl-arch", device="cpu", dtype="bf16")
    counts = parameter_counts(pipe)
    assert abs(counts["unet"] - 2567.46e6) < 1e6  # SDXL base 1.0
    assert abs(counts["text_encoder_2"] - 694.66e6) < 1e6  # OpenCLIP ViT-bigG/14's text tower with its projection
    assert family_of(pipe).name == "sdxl" and family_of(pipe).pooled_width(pipe) == 1280


@pytest.mark.slow
def test_sd3_arch_has_sd35_medium_parameter_counts_and_is_the_sd3_family():
    from trce.families import family_of
    from trce.loading import parameter_counts

    pipe = load_pipeline("sd3-arch", device="cpu", dtype="bf16")
    counts = parameter_counts(pipe)
    assert abs(counts["transformer"] - 2243.17e6) < 1e6  # SD 3.5 medium's MMDiT-X
    assert abs(counts["text_encoder_2"] - 694.66e6) < 1e6
    fam = family_of(pipe)
    assert fam.name == "sd3" and fam.text_width(pipe) == 4096 and fam.image_size(pipe) == 1024
