"""FLUX.1: the family packs 2x2 latent patches as FluxPipeline does, stage T edits the context embedder (T5 rows) and
the pooled projection (CLIP-L), and erase / eval / attack / report (and KPOP's hidden prompt, injected into the
joint blocks' attention) run end to end through the CLI on tiny random FluxPipelines, guidance-distilled (dev) and
not (schnell)."""

from __future__ import annotations

import json

import pytest
import torch
from joint_kpop import check_hidden_prompt_eval_and_install, kpop_erase_on_the_cli

import trce
from trce.families import family_of
from trce.testing import tiny_flux_pipeline


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux") / "pipe"
    tiny_flux_pipeline().save_pretrained(folder, safe_serialization=True)
    return folder


def test_the_family_reads_t5_tokens_and_the_pooled_clip_vector():
    pipe = tiny_flux_pipeline()
    fam = family_of(pipe)
    assert fam.name == "flux" and fam.denoiser(pipe) is pipe.transformer and fam.tokenizer(pipe) is pipe.tokenizer_2
    assert {i.name: i.paths for i in fam.text_inputs(pipe)} == {
        "tokens": ("transformer.context_embedder.weight",),
        "pooled": ("transformer.time_text_embed.text_embedder.linear_1.weight",)}
    cond = fam.encode(pipe, ["a red circle", "a blue star"])
    embeds, pooled, _ = pipe.encode_prompt(["a red circle", "a blue star"], None, device="cpu",
                                           max_sequence_length=pipe.tokenizer_2.model_max_length)
    assert torch.allclose(cond[:, :-1], embeds, atol=1e-6) and torch.allclose(cond[:, -1, :32], pooled, atol=1e-6)
    from trce.tokens import tokenize

    again = fam.encode_ids(pipe, tokenize(pipe.tokenizer_2, ["a red circle", "a blue star"]))
    assert torch.allclose(again, cond, atol=1e-5)  # what the attacks optimise through


def test_predict_is_the_pipelines_own_step():
    """The family's prediction on unpacked latents equals the transformer's on the pipeline's packed latents."""
    pipe = tiny_flux_pipeline()
    fam = family_of(pipe)
    cond = fam.encode(pipe, ["a red circle"])
    z = torch.randn(1, *fam.latent_shape(pipe))  # (1, 4, 8, 8)
    c, h, w = z.shape[1:]
    packed = pipe._pack_latents(z, 1, c, h, w)
    ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", z.dtype)
    with torch.no_grad():
        ours = fam.predict(pipe.transformer, z, torch.tensor(700.0), cond)
        theirs = pipe.transformer(hidden_states=packed, timestep=torch.tensor([0.7]), guidance=torch.tensor([1.0]),
                                  pooled_projections=cond[:, -1], encoder_hidden_states=cond[:, :-1],
                                  txt_ids=torch.zeros(cond.shape[1] - 1, 3), img_ids=ids).sample
    assert torch.allclose(pipe._unpack_latents(theirs, 32, 32, pipe.vae_scale_factor), ours, atol=1e-6)
    sampler = fam.sampler(pipe.scheduler.config, 4)  # the pipeline's shifted sigmas 1 .. 1/4
    pipe.scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=1.15)
    assert torch.allclose(sampler.timesteps, pipe.scheduler.timesteps)


def test_only_the_joint_blocks_image_attention_is_visual():
    pipe = tiny_flux_pipeline()
    fam = family_of(pipe)
    visual = fam.trainable(pipe.transformer, "visual")
    assert visual and all(n.startswith("transformer_blocks.") and ".attn.to_" in n and "add" not in n for n in visual)
    cross = fam.trainable(pipe.transformer, "cross-attn")
    assert not set(visual) & set(cross)
    assert any(n.startswith("single_transformer_blocks.") for n in cross)  # single blocks read text with to_k/to_v


@pytest.mark.parametrize("distilled", [True, False], ids=["dev", "schnell"])
def test_stage_t_maps_the_erase_rows_and_reverts_bit_for_bit(distilled, tmp_path):
    pipe = tiny_flux_pipeline(guidance_embeds=distilled)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    edit = trce.erase(pipe, "shapeworld-red", stages="T", cache=tmp_path, progress=False)
    assert set(edit.weights) == {"transformer.context_embedder.weight",
                                 "transformer.time_text_embed.text_embedder.linear_1.weight"}
    with edit.applied(pipe):
        changed = [k for k, v in pipe.transformer.state_dict().items() if not torch.equal(v, before[k])]
        assert sorted(changed) == ["context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight"]
    assert all(torch.equal(pipe.transformer.state_dict()[k], v) for k, v in before.items())


@pytest.mark.heavy
def test_erase_eval_attack_and_report_end_to_end_on_the_cli(flux_dir, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    for method, sets in (("trce", ["V.n_trajectories=2", "V.n_uncond=4", "V.ddim_steps=3", "V.epochs=1"]),
                         ("uce", []), ("esd", ["esd.iterations=2", "esd.ddim_steps=2", "esd.latents=current"])):
        code, _, err = run_cli("erase", "--model", flux_dir, "--concept", "shapeworld-red", "--method", method,
                               *[a for s in sets for a in ("--set", s)], "--out", tmp_path / method)
        assert code == 0, err
    meta = json.loads((tmp_path / "trce" / "patch.json").read_text())
    assert "transformer.context_embedder.weight" in meta["tensors"]
    assert any(p.startswith("transformer.transformer_blocks.") and ".attn.to_q." in p for p in meta["tensors"])
    code, _, err = run_cli("eval", "--model", flux_dir, "--patch", tmp_path / "trce", "--suite", "shapeworld-red",
                           "--limit", 1, "--steps", 2, "--no-progress", "--out", tmp_path / "eval")
    assert code == 0, err
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == 9
    for attack, budget in (("ring-a-bell", ["generations=2", "population=4", "elite=2"]),
                           ("unlearndiff", ["steps=1", "samples=2", "blocks=1"]), ("soft-prompt", ["steps=1", "samples=2"]),
                           ("mma-text", ["steps=1", "candidates=4"])):
        code, _, err = run_cli("attack", "--model", flux_dir, "--patch", tmp_path / "uce", "--suite", "shapeworld-red",
                               "--attack", attack, "--limit", 1, "--steps", 2, "--no-progress", "--budget", *budget,
                               "--out", tmp_path / attack)
        assert code == 0, (attack, err)
    code, _, err = run_cli("report", tmp_path / "eval", "--out", tmp_path / "report.html")
    assert code == 0, err
    code, _, err = run_cli("generate", "--model", flux_dir, "--patch", tmp_path / "trce", "--prompt", "a red circle",
                           "--steps", 2, "--out", tmp_path / "gen.png")
    assert code == 0, err
    code, _, err = run_cli("export", "--model", flux_dir, "--patch", tmp_path / "trce", "--out", tmp_path / "exported")
    assert code == 0, err
    exported = trce.load_pipeline(tmp_path / "exported")
    assert type(exported).__name__ == "FluxPipeline" and family_of(exported).name == "flux"


def test_kpop_erase_and_eval_with_the_hidden_prompt_on_the_cli(flux_dir, tmp_path, run_cli, monkeypatch):
    """`trce erase --method kpop`, `trce eval` with and without the hidden prompt, and `hidden_prompt_installed`: the
    prompt joins the joint block's context rows (identity rotary rows after the text's), the single block is left."""
    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    pipe, fam, edit, patch = kpop_erase_on_the_cli(flux_dir, tmp_path, run_cli)
    width = fam.injection_width(pipe)  # the inner width (16 here), not T5's (32)
    assert width == pipe.transformer.inner_dim != fam.text_width(pipe)
    assert edit.method == "kpop" and edit.extras["hidden_prompt"].shape == (32, width)  # m_p = 1 x 32 T5 rows
    assert edit.settings["injection"]["layers"] == ["transformer_blocks.0.attn.processor"]
    check_hidden_prompt_eval_and_install(flux_dir, tmp_path, run_cli, pipe, fam, patch, rows=32)
