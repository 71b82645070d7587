"""SD 3: the MMDiT family. Stage T edits the context embedder and the pooled projection, the flow sampler is the
scheduler's Euler step without its state, and erase / eval / attack (and KPOP's hidden prompt, injected into the
joint attention) run end to end through the CLI on a tiny random StableDiffusion3Pipeline without T5."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from every_method import assert_one_pass_states
from joint_kpop import check_hidden_prompt_eval_and_install, kpop_erase_on_the_cli

import trce
from trce.families import family_of
from trce.families.sd3 import CollapsedRowsJointProcessor, FlowSampler
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


@pytest.mark.heavy
def test_erase_eval_and_attack_end_to_end_on_the_cli(sd3_dir, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    for method, sets in (("trce", ["V.n_trajectories=2", "V.n_uncond=4", "V.ddim_steps=3", "V.epochs=1"]),
                         ("uce", []), ("esd", ["esd.iterations=2", "esd.ddim_steps=2", "esd.latents=current"])):
        code, _, err = run_cli("erase", "--model", sd3_dir, "--concept", "shapeworld-red", "--method", method,
                               *[a for s in sets for a in ("--set", s)], "--out", tmp_path / method)
        assert code == 0, err
    meta = json.loads((tmp_path / "trce" / "patch.json").read_text())
    assert "transformer.context_embedder.weight" in meta["tensors"]
    # the spec's sd3 safe text ("blue", `erase.family_targets`) is the one erased towards, and recorded
    assert meta["spec"]["family"] == "sd3" and meta["spec"]["expressions"][0]["family_targets"] == {"sd3": "blue"}
    assert any(".attn.to_q." in p for p in meta["tensors"])  # stage V: the image stream's attention
    code, _, err = run_cli("eval", "--model", sd3_dir, "--patch", tmp_path / "trce", "--suite", "shapeworld-red",
                           "--limit", 1, "--steps", 2, "--no-progress", "--out", tmp_path / "eval")
    assert code == 0, err
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] == 9
    for attack, budget in (("ring-a-bell", ["generations=2", "population=4", "elite=2"]),
                           ("unlearndiff", ["steps=1", "samples=2", "blocks=1"]), ("soft-prompt", ["steps=1", "samples=2"]),
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


def _randomised(pipe):
    """diffusers zero-initialises some outputs: make every path of the tiny transformer matter."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return pipe


def test_without_t5_trce_draws_with_one_zero_row_for_256_and_gets_the_same_images():
    """SD3 without T5: trce collapses the pipeline's 256 zero T5 rows into one weighed as 256 (the same function at
    a fraction of the joint sequence). Images drawn by trce equal the plain pipeline's; the processor it installs
    is diffusers' own computation when not asked to collapse; soft-prompt conditionings draw the same too."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    from trce.families.sd3 import T5_FREE_ROWS
    from trce.generate import GenSettings, generate, generate_iter

    pipe = _randomised(tiny_sd3_pipeline())
    fam = family_of(pipe)
    prompts, seeds = ["a red circle", "a blue square"], [0, 1]

    def plain():
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        return pipe(prompt=prompts, num_inference_steps=3, guidance_scale=5.0, generator=gens,
                    output_type="latent").images

    before = plain()
    assert all(type(p) is JointAttnProcessor2_0 for p in pipe.transformer.attn_processors.values())
    draw = fam.draw_kwargs(pipe)  # installs the collapsing processor
    m = pipe.tokenizer_max_length
    assert draw == {"max_sequence_length": 1, "joint_attention_kwargs": {"repeated_row": (m, T5_FREE_ROWS)}}
    assert all(type(p) is CollapsedRowsJointProcessor for p in pipe.transformer.attn_processors.values())
    assert torch.equal(plain(), before)  # without `repeated_row` it is JointAttnProcessor2_0's computation
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    fast = pipe(prompt=prompts, num_inference_steps=3, guidance_scale=5.0, generator=gens, output_type="latent",
                **draw).images
    assert torch.allclose(fast, before, atol=1e-5, rtol=1e-4), (fast - before).abs().max()
    settings = GenSettings(steps=3, guidance=5.0, batch_size=2)
    by_text = generate(pipe, prompts, seeds, settings, progress=False)
    cond = fam.encode(pipe, prompts)
    assert cond.shape[1] == m + T5_FREE_ROWS + 1  # the conditioning keeps the pipeline's layout
    inputs = fam.pipeline_inputs(pipe, cond)
    assert inputs["prompt_embeds"].shape[1] == m + 1 and inputs["joint_attention_kwargs"] == draw["joint_attention_kwargs"]
    by_embeds = np.concatenate([img for _, img in generate_iter(pipe, prompts, seeds, settings, progress=False,
                                                                  embeds=cond)])
    assert np.abs(by_text.astype(int) - by_embeds.astype(int)).max() <= 1


def test_predict_collapses_only_under_its_own_processor():
    """`predict` (stage V, ESD, attacks) gives the velocity of the full 256-row input, collapsed or not, gradients
    included; under another processor (a user's) the rows go in as they are."""
    from trce.families.sd3 import collapsible

    pipe = _randomised(tiny_sd3_pipeline())
    fam, tr = family_of(pipe), pipe.transformer
    cond = fam.encode(pipe, ["a red circle", "a green star"])
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([200.0, 700.0])
    full = tr(hidden_states=z, timestep=t, encoder_hidden_states=cond[:, :-1],
              pooled_projections=cond[:, -1, :64]).sample  # diffusers' processor, 256 zero rows
    w = tr.context_embedder.weight
    (g_full,) = torch.autograd.grad(full.square().sum(), w)
    fast = fam.predict(tr, z, t, cond)
    assert collapsible(tr)
    (g_fast,) = torch.autograd.grad(fast.square().sum(), w)
    assert torch.allclose(fast, full, atol=1e-5, rtol=1e-4)
    assert torch.allclose(g_fast, g_full, atol=1e-4, rtol=1e-3)
    tokens, joint = fam._collapsed(tr, cond[:, :-1])
    assert joint is not None and tokens.shape[1] == cond.shape[1] - 256
    other = {name: type("Other", (CollapsedRowsJointProcessor,), {})() for name in tr.attn_processors}
    tr.set_attn_processor(other)
    assert not collapsible(tr) and fam._collapsed(tr, cond[:, :-1])[1] is None



@pytest.mark.parametrize(("mode", "tokens"), [("concat", 3), ("add", 1)])
def test_kpop_injection_keeps_the_collapse_and_the_function(mode, tokens):
    """KPOP's prompt appended to the context rows (or one vector added to all of them) keeps identical rows
    identical: predict collapses under it and gives the full input's velocity; a position-wise added prompt does
    not collapse."""
    from trce.families.sd3 import collapsible
    from trce.prompt_injection import injected

    pipe = _randomised(tiny_sd3_pipeline())
    fam, tr = family_of(pipe), pipe.transformer
    cond = fam.encode(pipe, ["a red circle", "a green star"])
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([200.0, 700.0])
    prompt = torch.randn(tokens, fam.injection_width(pipe), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), injected(tr, prompt, mode, "all"):
        full = tr(hidden_states=z, timestep=t, encoder_hidden_states=cond[:, :-1],
                  pooled_projections=cond[:, -1, :64]).sample  # diffusers' processor inside, 256 zero rows
        assert collapsible(tr) and fam._collapsed(tr, cond[:, :-1])[1] is not None
        fast = fam.predict(tr, z, t, cond)
    assert torch.allclose(fast, full, atol=1e-5, rtol=1e-4)
    with injected(tr, torch.randn(cond.shape[1] - 1, fam.injection_width(pipe)), "add", "all"):
        assert not collapsible(tr) and fam._collapsed(tr, cond[:, :-1])[1] is None


@torch.no_grad()
def _stream_rows(pipe, prompts, point, block):
    """The text stream's eot rows where joint block `block` reads them (its add_k_proj input), read by a hook of
    the test's own on the model as it is."""
    from trce.tokens import first_eos, tokenize

    fam = family_of(pipe)
    seen = {}
    layer = pipe.transformer.transformer_blocks[block].attn.add_k_proj
    handle = layer.register_forward_hook(lambda _m, args, _o: seen.update(x=args[0]))
    try:
        z, t = point
        fam.predict(pipe.transformer, z.expand(len(prompts), *z.shape[1:]), t, fam.encode(pipe, prompts))
    finally:
        handle.remove()
    eos = first_eos(tokenize(fam.tokenizer(pipe), prompts), fam.tokenizer(pipe).eos_token_id)
    return seen["x"][torch.arange(len(prompts)), eos].double()  # (N, D)


@pytest.mark.parametrize("make", ["sd3", "flux"])
def test_layerwise_stage_t_maps_each_joint_blocks_own_stream_rows(make, tmp_path):
    from trce.concepts import spec_from_dict
    from trce.methods.layerwise import stream_points
    from trce.methods.stage_t import StageTConfig, erase
    from trce.registry import Context
    from trce.testing import tiny_flux_pipeline

    pipe = tiny_sd3_pipeline() if make == "sd3" else tiny_flux_pipeline()
    spec = spec_from_dict({"name": "cats", "erase": {"target": "a dog", "expressions": ["a cat", "a kitten", "a tabby"]},
                           "templates": ["a photo of {}", "a drawing of {} on a black background"], "preserve": "none"})
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    config = StageTConfig(layerwise=True, layer_points=1, eta=0.0, ridge=1e-9, pooled=False, token_role="eot")
    edit = erase(pipe, spec, config, Context(cache_dir=str(tmp_path / "cache"), progress=False, seed=0))
    blocks = list(range(len(pipe.transformer.transformer_blocks)))
    assert sorted(edit.weights) == sorted(f"transformer.transformer_blocks.{i}.attn.{p}_proj.weight"
                                          for i in blocks for p in ("add_k", "add_v"))  # not the context embedder
    assert edit.info["layerwise"]["blocks"] == len(blocks) and edit.settings["layerwise"] == {"points": 1}
    assert edit.info["layerwise"]["pairs_dropped"] == 0
    # the context embedder is left as it is, so no preservation prior is built or cached for it
    assert "prior_cache" not in edit.info and not list((tmp_path / "cache").rglob("*prior*"))
    # 6 pairs, one point: fewer rows than the stream's width, so Eq. 5 maps them exactly in every block
    point = stream_points(pipe, 1, seed=0)[0]
    pairs = spec.pairs()
    for i in blocks:
        em = _stream_rows(pipe, [p.malicious for p in pairs], point, i)
        es = _stream_rows(pipe, [p.safe for p in pairs], point, i)
        for proj in ("add_k", "add_v"):
            w = before[f"transformer_blocks.{i}.attn.{proj}_proj.weight"].double()
            new = edit.weights[f"transformer.transformer_blocks.{i}.attn.{proj}_proj.weight"].double()
            gap = torch.linalg.norm(em @ new.T - es @ w.T) / torch.linalg.norm((em - es) @ w.T)
            assert gap < 1e-3, (i, proj, float(gap))
    assert all(torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in before.items())  # fitting edits nothing
    with edit.applied(pipe):
        assert not torch.equal(pipe.transformer.transformer_blocks[0].attn.add_k_proj.weight,
                               before["transformer_blocks.0.attn.add_k_proj.weight"])
    assert all(torch.equal(v, pipe.transformer.state_dict()[k]) for k, v in before.items())  # reverted bit for bit


def test_layerwise_stage_t_is_refused_where_text_enters_only_through_cross_attention(tmp_path):
    from trce.errors import TrceError
    from trce.testing import tiny_pipeline

    with pytest.raises(TrceError, match="layerwise stage T needs a joint-attention denoiser"):
        trce.erase(tiny_pipeline(), "shapeworld-red", method="trce", stages="T", T={"layerwise": True},
                   progress=False, cache=str(tmp_path))
    with pytest.raises(TrceError, match="layerwise stage T cannot be hardened"):
        trce.erase(tiny_sd3_pipeline(), "shapeworld-red", method="trce", stages="T",
                   T={"layerwise": True, "robust": 1}, progress=False, cache=str(tmp_path))
