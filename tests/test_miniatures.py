"""ShapeWorld-XL and ShapeWorld-DiT: the training conditions the denoiser exactly as the pipeline will (SDXL's two
encoders, pooled vector and zero unconditional half; SD3's CLIP rows, 256 zero T5 rows and encoded empty prompt),
training resumes and refuses other settings, and the exported denoiser loads as a plain diffusers pipeline of
its family that every command takes."""

from __future__ import annotations

import json

import pytest
import torch

from trce.errors import TrceError
from trce.families import family_of
from trce.loading import shapeworld_dir
from trce.shapeworld.miniatures import (
    MiniatureConfig,
    MiniatureTrainer,
    assemble,
    denoiser_model,
    load_miniature,
    miniature_dir,
    text_encoder,
    train_miniature,
)


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_training_conditions_as_the_pipeline_does(family, tmp_path):
    from transformers import CLIPTokenizer

    trainer = MiniatureTrainer(tmp_path / "run", MiniatureConfig.tiny(family))
    base = shapeworld_dir()
    pipe = assemble(family, denoiser_model(family), base)
    prompts = ["a red circle on a black background", "draw a crimson star shape"]
    tok = CLIPTokenizer.from_pretrained(base / "tokenizer")
    with torch.no_grad():
        out = text_encoder(base, True)(tok(prompts, padding="max_length", return_tensors="pt").input_ids,
                                       output_hidden_states=True)
        if family == "sd3":
            trainer._empty = trainer._empty_prompt()
        tokens, pooled = trainer._condition(out.hidden_states[-2], out.text_embeds, torch.tensor([False, True]))
        if family == "sdxl":
            embeds, neg, pool, neg_pool = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=True)
            assert torch.allclose(tokens[0], embeds[0], atol=1e-5) and torch.allclose(pooled[0], pool[0], atol=1e-5)
            assert torch.equal(tokens[1], neg[1]) and torch.equal(pooled[1], neg_pool[1])  # zeros, as the pipeline
        else:
            embeds, neg, pool, neg_pool = pipe.encode_prompt(prompts, None, None, device="cpu",
                                                             do_classifier_free_guidance=True)
            assert tokens.shape == embeds.shape  # 32 CLIP rows + 256 zero rows (no T5)
            assert torch.allclose(tokens[0], embeds[0], atol=1e-5) and torch.allclose(pooled[0], pool[0], atol=1e-5)
            assert torch.allclose(tokens[1], neg[1], atol=1e-5) and torch.allclose(pooled[1], neg_pool[1], atol=1e-5)


@pytest.mark.parametrize("family, name, cls", [("sdxl", "shapeworld-xl", "StableDiffusionXLPipeline"),
                                               ("sd3", "shapeworld-dit", "StableDiffusion3Pipeline")])
def test_a_tiny_run_exports_a_denoiser_that_loads_as_its_family(family, name, cls, tmp_path):
    export, _ = train_miniature(tmp_path / "run", family, tiny=True)
    pipe = load_miniature(name, folder=export)
    assert type(pipe).__name__ == cls and family_of(pipe).name == family
    image = pipe(["a red circle"], num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 32, 32, 3)
    record = json.loads((export / "made.json").read_text())
    assert record["config"]["family"] == family and record["stages"]["denoiser"]["steps"] == 4
    again, _ = train_miniature(tmp_path / "run", family, tiny=True)  # finished: nothing is redone
    assert again == export
    with pytest.raises(TrceError, match="other settings"):
        train_miniature(tmp_path / "run", family, tiny=True, lr=1e-3)


def test_the_cli_trains_a_miniature_and_refuses_sd1_options(tmp_path, run_cli):
    code, _, err = run_cli("shapeworld", "train", "--family", "sd3", "--tiny", "--out", tmp_path / "dit")
    assert code == 0, err
    assert (tmp_path / "dit" / "export" / "transformer" / "config.json").exists()
    code, _, err = run_cli("shapeworld", "train", "--family", "sdxl", "--tiny", "--clip-steps", "3",
                           "--out", tmp_path / "xl")
    assert code == 2 and "--clip-steps trains a part of the sd1 model" in err


def test_the_shipped_xl_miniature_is_a_plain_sdxl_pipeline():
    """ShapeWorld-XL ships in the package (denoiser + made.json) and assembles around ShapeWorld's parts."""
    from trce.loading import load_pipeline

    pipe = load_pipeline("shapeworld-xl", device="cpu")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and family_of(pipe).name == "sdxl"
    made = json.loads((miniature_dir("sdxl") / "made.json").read_text())
    assert made["config"]["family"] == "sdxl" and made["config"]["steps"] == 3000
    image = pipe(["a red circle on a blue background"], num_inference_steps=2, height=32, width=32,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3)
