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
from trce.families.sd3 import T5_FREE_ROWS, CollapsedRowsJointProcessor
from trce.shapeworld import weights_dir
from trce.shapeworld.miniatures import MiniatureConfig, MiniatureTrainer, train_miniature
from trce.shapeworld.pipelines import assemble, denoiser_model, load_miniature, miniature_dir, text_encoder


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_training_conditions_as_the_pipeline_does(family, tmp_path):
    from transformers import CLIPTokenizer

    trainer = MiniatureTrainer(tmp_path / "run", MiniatureConfig.tiny(family))
    base = weights_dir()
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
            # the pipeline: 32 CLIP rows + T5_FREE_ROWS zero rows (no T5); training: the 32 rows + one zero row that
            # stands for them (CollapsedRowsJointProcessor, tested equal below)
            assert embeds.shape[1] == tokens.shape[1] - 1 + T5_FREE_ROWS and not embeds[:, tokens.shape[1] - 1:].any()
            n = tokens.shape[1]
            assert not tokens[:, -1].any()
            assert torch.allclose(tokens[0], embeds[0, :n], atol=1e-5) and torch.allclose(pooled[0], pool[0], atol=1e-5)
            assert torch.allclose(tokens[1], neg[1, :n], atol=1e-5) and torch.allclose(pooled[1], neg_pool[1], atol=1e-5)


def test_one_stand_in_row_trains_the_function_of_the_pipelines_256_zero_rows():
    """ShapeWorld-DiT trains with one zero row for T5's 256 (a sixth of the sequence); the transformer must compute
    the same velocity from both, for trained-looking (non-zero) weights and every block, the last included."""
    model = denoiser_model("sd3", seed=0).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # diffusers zero-initialises some outputs: make every path matter
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 4, 8, 8)
    clip = torch.randn(2, 32, 512)
    pooled = torch.randn(2, 256)
    t = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        full = model(hidden_states=x, timestep=t, pooled_projections=pooled,
                     encoder_hidden_states=torch.cat([clip, torch.zeros(2, T5_FREE_ROWS, 512)], 1)).sample
        model.set_attn_processor(CollapsedRowsJointProcessor())
        short = model(hidden_states=x, timestep=t, pooled_projections=pooled,
                      encoder_hidden_states=torch.cat([clip, torch.zeros(2, 1, 512)], 1),
                      joint_attention_kwargs={"repeated_row": (32, T5_FREE_ROWS)}).sample
        once = model(hidden_states=x, timestep=t, pooled_projections=pooled,
                     encoder_hidden_states=torch.cat([clip, torch.zeros(2, 1, 512)], 1)).sample
    assert torch.allclose(full, short, atol=1e-4, rtol=1e-4), (full - short).abs().max()
    assert (full - once).abs().max() > 100 * (full - short).abs().max()  # one plain zero row is another function


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


def test_the_cli_warm_starts_a_miniature_from_a_finished_run(tmp_path, run_cli):
    """`--warm-start RUN` (sdxl / sd3): the new run starts from the finished run's EMA denoiser, reuses its cache
    (same pool and captions) and draws the batches after those it drew; a run of another family is refused."""
    from trce.utils import io

    code, _, err = run_cli("shapeworld", "train", "--family", "sd3", "--tiny", "--out", tmp_path / "a")
    assert code == 0 and "render pool" in err, err
    code, _, err = run_cli("shapeworld", "train", "--family", "sd3", "--tiny", "--warm-start", tmp_path / "a",
                           "--out", tmp_path / "b")
    assert code == 0, err
    assert "render pool" not in err and "sd3 denoiser" in err  # the cache was copied, not made again
    made = json.loads((tmp_path / "b" / "export" / "made.json").read_text())
    assert made["config"]["warm_start"] == str(tmp_path / "a")
    from dataclasses import replace

    trainer = MiniatureTrainer(tmp_path / "b", replace(MiniatureConfig.tiny("sd3"), warm_start=str(tmp_path / "a")))
    assert trainer._data_offset() == 4  # the tiny run's 4 steps come first
    # it starts from a's EMA weights: at learning rate 0 they come out unchanged
    train_miniature(tmp_path / "still", "sd3", tiny=True, lr=0.0, warm_start=str(tmp_path / "a"))
    a = io.load_tensors(tmp_path / "a" / "denoiser" / "ema.safetensors")
    still = io.load_tensors(tmp_path / "still" / "denoiser" / "ema.safetensors")
    assert all(torch.equal(a[k], still[k]) for k in a)
    code, _, err = run_cli("shapeworld", "train", "--family", "sdxl", "--tiny", "--warm-start", tmp_path / "a",
                           "--out", tmp_path / "c")
    assert code == 2 and "trained a sd3 denoiser, not sdxl" in err


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


def test_the_shipped_dit_miniature_is_a_plain_sd3_pipeline_without_t5():
    """ShapeWorld-DiT ships in the package (transformer + made.json: warm-started from a finished 3,000-step run)
    and assembles around ShapeWorld's parts as a StableDiffusion3Pipeline with text_encoder_3=None."""
    from trce.loading import load_pipeline

    pipe = load_pipeline("shapeworld-dit", device="cpu")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline" and family_of(pipe).name == "sd3"
    assert pipe.text_encoder_3 is None
    made = json.loads((miniature_dir("sd3") / "made.json").read_text())
    assert made["config"]["family"] == "sd3" and made["config"]["steps"] == 2000 and made["config"]["warm_start"]
    image = pipe(["a red circle on a blue background"], num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3)
