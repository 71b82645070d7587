"""SD 3: the MMDiT family. Stage T edits the context embedder and the pooled projection, the flow sampler is the
scheduler's Euler step without its state, and erase / eval / attack (and KPOP's hidden prompt, injected into the
joint attention) run end to end through the CLI on a tiny random StableDiffusion3Pipeline without T5."""

from __future__ import annotations

import json

import pytest
import torch
from every_method import assert_one_pass_states
from joint_kpop import check_hidden_prompt_eval_and_install, kpop_erase_on_the_cli

import trce
from trce.families import family_of
from trce.families.sd3 import FlowSampler
from trce.testing import tiny_sd3_pipeline


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3") / "pipe"
    tiny_sd3_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


def test_the_family_and_its_two_text_inputs():
    pipe = tiny_sd3_pipeline()
    fam = family_of(pipe)
    assert fam.name == "sd3" and fam.denoiser(pipe) is pipe.transformer
    inputs = {i.name: i.paths for i in fam.text_inputs(pipe)}
    assert inputs == {"tokens": ("transformer.context_embedder.weight",),
                      "pooled": ("transformer.time_text_embed.text_embedder.linear_1.weight",)}
    cond = fam.encode(pipe, ["a red circle"])
    embeds, _, pooled, _ = pipe.encode_prompt(["a red circle"], None, None, device="cpu",
                                              do_classifier_free_guidance=False)
    assert torch.equal(cond[:, :-1], embeds) and torch.equal(cond[:, -1, :64], pooled)
    from trce.tokens import tokenize

    again = fam.encode_ids(pipe, tokenize(pipe.tokenizer, ["a red circle"]))  # what the attacks optimise through
    assert torch.allclose(again, cond, atol=1e-5)
    assert_one_pass_states(fam, pipe)  # stage T reads token states and pooled vectors from one encoder pass


def test_the_flow_sampler_is_the_schedulers_euler_step_without_state():
    pipe = tiny_sd3_pipeline()
    sampler = FlowSampler(pipe.scheduler.config, 4)
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    ref.set_timesteps(4)
    z = a = torch.randn(1, 4, 8, 8)
    for t in ref.timesteps:
        v = torch.randn(1, 4, 8, 8)
        z, a = ref.step(v, t, z).prev_sample, sampler.step(v, t, a).prev_sample
        assert torch.allclose(z, a, atol=1e-6)
    again = sampler.step(v, ref.timesteps[0], a).prev_sample  # no hidden step counter: any step, any order
    assert torch.allclose(again, a + (sampler.sigmas[1] - sampler.sigmas[0]) * v)


def test_erase_eval_and_attack_end_to_end_on_the_cli(sd3_dir, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    for method, sets in (("trce", ["V.n_trajectories=2", "V.n_uncond=4", "V.ddim_steps=3", "V.epochs=1"]),
                         ("uce", []), ("esd", ["esd.iterations=2", "esd.ddim_steps=2", "esd.latents=current"])):
        code, _, err = run_cli("erase", "--model", sd3_dir, "--concept", "shapeworld-red", "--method", method,
                               *[a for s in sets for a in ("--set", s)], "--out", tmp_path / method)
        assert code == 0, err
    meta = json.loads((tmp_path / "trce" / "patch.json").read_text())
    assert "transformer.context_embedder.weight" in meta["tensors"]
    assert any(".attn.to_q." in p for p in meta["tensors"])  # stage V: the image stream's attention
    code, _, err = run_cli("eval", "--model", sd3_dir, "--patch", tmp_path / "trce", "--suite", "shapeworld-red",
                           "--limit", 1, "--steps", 2, "--no-progress", "--out", tmp_path / "eval")
    assert code == 0, err
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == 9
    for attack, budget in (("ring-a-bell", ["generations=2", "population=4", "elite=2"]),
                           ("unlearndiff", ["steps=1", "samples=2"]), ("soft-prompt", ["steps=1", "samples=2"]),
                           ("mma-text", ["steps=1", "candidates=4"])):
        code, _, err = run_cli("attack", "--model", sd3_dir, "--patch", tmp_path / "uce", "--suite", "shapeworld-red",
                               "--attack", attack, "--limit", 1, "--steps", 2, "--no-progress", "--budget", *budget,
                               "--out", tmp_path / attack)
        assert code == 0, (attack, err)


def test_the_pipeline_is_left_as_it_was(tmp_path):
    pipe = tiny_sd3_pipeline()
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    edit = trce.erase(pipe, "shapeworld-red", stages="T", cache=tmp_path, progress=False)
    with edit.applied(pipe):
        assert not torch.equal(pipe.transformer.context_embedder.weight, before["context_embedder.weight"])
    assert all(torch.equal(pipe.transformer.state_dict()[k], v) for k, v in before.items())


def test_kpop_erase_and_eval_with_the_hidden_prompt_on_the_cli(sd3_dir, tmp_path, run_cli, monkeypatch):
    """`trce erase --method kpop`, `trce eval` with and without the hidden prompt, and `hidden_prompt_installed`: the
    prompt joins the joint blocks' context rows, in the context stream's width, not the text's."""
    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    pipe, fam, edit, patch = kpop_erase_on_the_cli(sd3_dir, tmp_path, run_cli)
    width = fam.injection_width(pipe)  # caption_projection_dim (16 here), not the joint text width (64)
    assert width == pipe.transformer.config.caption_projection_dim != fam.text_width(pipe)
    tokens = 32 + 256  # m_p = 1 x m_c: CLIP's rows and T5's zero rows
    assert edit.method == "kpop" and edit.extras["hidden_prompt"].shape == (tokens, width)
    assert edit.settings["injection"]["layers"] == fam.injection_layers(pipe.transformer, edit.settings["sites"])
    check_hidden_prompt_eval_and_install(sd3_dir, tmp_path, run_cli, pipe, fam, patch, rows=tokens)
