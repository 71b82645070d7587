"""KPOP (knowledge transfer and removal with a learnable prompt) on the tiny pipeline."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trce.edit import Edit, load_patch
from trce.errors import TrceError
from trce.families import family_of
from trce.families.injection import PromptInjectionProcessor
from trce.generate import GenSettings, generate
from trce.methods.kpop import KPOPConfig, erase_kpop, generate_with_hidden_prompt
from trce.prompt_injection import hidden_prompt, hidden_prompt_installed
from trce.testing import Killed, die_after_checkpoint

ERASE = ["a red circle", "a crimson disc"]
FAST = {"iterations": 4, "ddim_steps": 4, "lr": 1e-3, "prompt_lr": 1e-2}


def _state(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder", "vae")
            for k, v in getattr(pipe, c).state_dict().items()}


@pytest.mark.parametrize("group", ["cross-attn", "non-cross-attn"])
def test_only_the_selected_group_changes_and_the_pipeline_is_left_as_it_was(tiny_pipe, group):
    before = _state(tiny_pipe)
    processors = dict(tiny_pipe.unet.attn_processors)
    edit = erase_kpop(tiny_pipe, ERASE, KPOPConfig(params=group, **FAST), progress=False)
    assert edit.method == "kpop"
    expected = {f"unet.{n}" for n in family_of(tiny_pipe).trainable(tiny_pipe.unet, group)}
    assert set(edit.weights) == expected
    if group == "cross-attn":
        assert all(".attn2." in p for p in expected)
    else:
        assert not any(".attn2." in p or p.startswith(("unet.time_embedding", "unet.conv_out")) for p in expected)
    assert any(not torch.equal(edit.weights[p], before[p]) for p in expected)
    # erase_kpop restores the pipeline exactly: weights, processors, requires_grad
    assert all(torch.equal(v, before[k]) for k, v in _state(tiny_pipe).items())
    assert all(tiny_pipe.unet.attn_processors[k] is v for k, v in processors.items())
    assert all(p.requires_grad for p in tiny_pipe.unet.parameters())
    with edit.applied(tiny_pipe):
        after = _state(tiny_pipe)
    assert all(torch.equal(v, before[k]) for k, v in after.items() if k not in expected)
    assert all(torch.equal(after[k], edit.weights[k]) for k in expected)
    assert edit.extras["hidden_prompt"].shape == (10 * 32, 32)  # m_p = k m_c, k = 10 by default


def test_transfer_steps_lower_the_transfer_loss(tiny_pipe):
    # one prompt, one cached trajectory, one DDIM step: the same (z_t, t, c_e) every iteration, and
    # theta' practically frozen, so the history shows the transfer steps alone (Eq. 6)
    cfg = KPOPConfig(iterations=8, lr=1e-12, prompt_lr=0.05, prompt_init="random", prompt_size=1,
                     latents="cached", ddim_steps=1, cache_trajectories=1)
    losses = erase_kpop(tiny_pipe, ERASE[:1], cfg, progress=False).info["history"]["transfer"]
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("mode,tokens", [("concat", 3 * 32), ("add", 32)])
def test_the_patch_round_trips_with_its_hidden_prompt(tiny_pipe, tmp_path, mode, tokens):
    cfg = KPOPConfig(mode=mode, prompt_size=3 if mode == "concat" else None, latents="cached", cache_trajectories=1,
                     sites="mid+up", **FAST)
    edit = erase_kpop(tiny_pipe, ERASE, cfg, progress=False)
    assert edit.extras["hidden_prompt"].shape == (tokens, 32)
    assert edit.settings["injection"]["mode"] == mode and edit.settings["lam"] == cfg.lam
    settings = GenSettings(steps=2, guidance=5.0, batch_size=2)
    prompts, seeds = ERASE, [0, 1]
    with edit.applied(tiny_pipe):
        erased = generate(tiny_pipe, prompts, seeds, settings, progress=False)
    recovered = generate_with_hidden_prompt(tiny_pipe, edit, prompts, seeds, settings, progress=False, apply=True)
    assert not (recovered == erased).all()  # the hidden prompt acts

    loaded = load_patch(edit.save(tmp_path / "patch", config=dataclasses.asdict(cfg)))
    assert torch.equal(loaded.extras["hidden_prompt"], edit.extras["hidden_prompt"])
    with loaded.applied(tiny_pipe):
        assert (generate(tiny_pipe, prompts, seeds, settings, progress=False) == erased).all()
        with hidden_prompt_installed(tiny_pipe, loaded):
            assert (generate(tiny_pipe, prompts, seeds, settings, progress=False) == recovered).all()
    assert not any(isinstance(p, PromptInjectionProcessor) for p in tiny_pipe.unet.attn_processors.values())
    # combined with another method's edit, the hidden prompt is still found
    combined = Edit(weights={}, method="uce").combine(loaded)
    assert torch.equal(hidden_prompt(combined)[0], edit.extras["hidden_prompt"])


def test_checkpoints_resume_to_the_same_result(tiny_pipe, tmp_path, monkeypatch):
    from trce.methods import kpop

    cfg = KPOPConfig(iterations=6, ddim_steps=3, lr=1e-3, prompt_lr=1e-2)
    ckpt = tmp_path / "ckpt"
    first = erase_kpop(tiny_pipe, ERASE, cfg, progress=False)  # uninterrupted
    die_after_checkpoint(monkeypatch, kpop)  # as if killed right after the checkpoint of iteration 3
    with pytest.raises(Killed):
        erase_kpop(tiny_pipe, ERASE, cfg, progress=False, checkpoint_dir=ckpt, checkpoint_every=3)
    monkeypatch.undo()
    assert [p.name for p in ckpt.glob("step-*")] == ["step-00000003"]
    resumed = erase_kpop(tiny_pipe, ERASE, cfg, progress=False, checkpoint_dir=ckpt, checkpoint_every=3)
    assert resumed.info["resumed_from"] == 3 and not ckpt.exists()  # a finished run removes its checkpoints
    assert all(torch.equal(resumed.weights[k], v) for k, v in first.weights.items())
    assert torch.equal(resumed.extras["hidden_prompt"], first.extras["hidden_prompt"])
    assert resumed.info["history"] == first.info["history"]
    die_after_checkpoint(monkeypatch, kpop)
    with pytest.raises(Killed):
        erase_kpop(tiny_pipe, ERASE, cfg, progress=False, checkpoint_dir=ckpt, checkpoint_every=3)
    with pytest.raises(TrceError, match="differs in: lam"):
        erase_kpop(tiny_pipe, ERASE, dataclasses.replace(cfg, lam=0.5), progress=False, checkpoint_dir=ckpt)


def test_nan_stops_with_a_clear_error_and_restores_the_pipeline(tiny_pipe):
    weight = tiny_pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_k.weight
    with torch.no_grad():
        weight[0, 0] = float("nan")
    before = _state(tiny_pipe)
    with pytest.raises(TrceError, match=r"diverged: the loss is nan \(not finite\) at step 1 of 4"):
        erase_kpop(tiny_pipe, ERASE, KPOPConfig(**FAST), progress=False)
    assert all(torch.equal(v, before[k]) or (v.isnan() == before[k].isnan()).all() for k, v in _state(tiny_pipe).items())
    assert not any(isinstance(p, PromptInjectionProcessor) for p in tiny_pipe.unet.attn_processors.values())


@pytest.mark.parametrize("values,bad", [
    ({"params": "attention"}, "'attention'"),
    ({"mode": "prefix"}, "'prefix'"),
    ({"sites": "down"}, "'down'"),
    ({"latents": "fresh"}, "'fresh'"),
    ({"prompt_init": "ones"}, "'ones'"),
    ({"preserve_latents": "keep"}, "'keep'"),
    ({"negative_guidance": -1}, "negative_guidance must be a number >= 0, got -1"),
    ({"preserve_weight": float("nan")}, "preserve_weight must be a number >= 0, got nan"),
    ({"lr": -1.0}, "-1.0"),
    ({"lam": 0}, "lam must be a positive number, got 0"),
    ({"iterations": 0}, "iterations must be a positive integer, got 0"),
    ({"prompt_size": 2, "prompt_tokens": 5}, "prompt_size \\(2\\) or prompt_tokens \\(5\\)"),
    ({"mode": "add", "prompt_size": 3}, "k=3"),
    ({"lamda": 0.1}, "'lamda' \\(did you mean 'lam'\\?\\)"),
])
def test_bad_config_values_are_named(values, bad):
    with pytest.raises(TrceError, match=bad):
        KPOPConfig.from_dict(values)


def test_bad_inputs_are_named(tiny_pipe):
    with pytest.raises(TrceError, match="prompt_tokens=7"):
        erase_kpop(tiny_pipe, ERASE, KPOPConfig(mode="add", prompt_tokens=7, **FAST), progress=False)
    with pytest.raises(TrceError, match="non-empty list"):
        erase_kpop(tiny_pipe, "a red circle", KPOPConfig(**FAST), progress=False)
    with pytest.raises(TrceError, match="no hidden prompt"), hidden_prompt_installed(tiny_pipe, Edit({}, "uce")):
        pass


@pytest.mark.parametrize("mode", ["concat", "add"])
def test_the_default_prompt_starts_as_a_no_op(tiny_pipe, mode):
    # concat: p_0 = the erase prompt's own embeddings repeated k times; add: p_0 = 0 (Table 1)
    cfg = KPOPConfig(iterations=1, mode=mode, ddim_steps=2)
    first = erase_kpop(tiny_pipe, ERASE[:1], cfg, progress=False).info["history"]["transfer"][0]
    random = erase_kpop(tiny_pipe, ERASE[:1], dataclasses.replace(cfg, prompt_init="random"),
                        progress=False).info["history"]["transfer"][0]
    assert first < 1e-6 * random, (first, random)


def test_a_half_precision_unet_trains_in_fp32_and_comes_back_bit_identical(tiny_pipe):
    torch.nn.Module.to(tiny_pipe.unet, torch.bfloat16)
    before = _state(tiny_pipe)
    edit = erase_kpop(tiny_pipe, ERASE, KPOPConfig(**FAST), progress=False)
    after = _state(tiny_pipe)
    assert all(v.dtype == before[k].dtype and torch.equal(v, before[k]) for k, v in after.items())
    assert {v.dtype for v in edit.weights.values()} == {torch.float32}


def test_safe_neutral_maps_each_erase_prompt_to_its_own_safe_prompt(tiny_pipe):
    cfg = KPOPConfig(neutral="safe", **FAST)
    with pytest.raises(TrceError, match="one safe prompt per erase prompt"):
        erase_kpop(tiny_pipe, ERASE, cfg, progress=False)
    safe = ["a circle", "a disc"]
    edit = erase_kpop(tiny_pipe, ERASE, cfg, safe_prompts=safe, progress=False)
    assert edit.settings["safe_prompts"] == safe and edit.settings["neutral"] == "safe"
    # A different c_n gives a different removal target, so different weights from the same seed.
    plain = erase_kpop(tiny_pipe, ERASE, KPOPConfig(**FAST), progress=False)
    assert any(not torch.equal(edit.weights[k], plain.weights[k]) for k in edit.weights)


def test_negative_guidance_pushes_the_removal_target_away_from_the_concept(tiny_pipe):
    # At iteration 1 theta' is still theta, so eps_theta'(c_e) = eps_theta(c_e) and L1 is the distance to the
    # target: eps_n - eta_n (eps_e - eps_n) is (1 + eta_n) times farther from eps_e than eps_n (ESD's target)
    cfg = KPOPConfig(iterations=1, ddim_steps=2, neutral_prompt="a photo")
    plain = erase_kpop(tiny_pipe, ERASE, cfg, progress=False).info["history"]["l1"][0]
    guided = erase_kpop(tiny_pipe, ERASE, dataclasses.replace(cfg, negative_guidance=2.0),
                        progress=False).info["history"]["l1"][0]
    assert plain > 0 and guided == pytest.approx(9 * plain, rel=1e-4)


def test_negative_others_pushes_away_from_the_other_erased_concepts(tiny_pipe):
    # Iteration 1, theta' = theta: with the other concept's prompt equal to c_e itself the target is
    # eps_n - (eta_n + eta_o) (eps_e - eps_n), so L1 is (1 + eta_n + eta_o)^2 times the unguided one; a different
    # other concept gives a different target.
    cfg = KPOPConfig(iterations=1, ddim_steps=2, neutral_prompt="a photo", negative_guidance=1.0, negative_others=0.5)
    plain = erase_kpop(tiny_pipe, ERASE, dataclasses.replace(cfg, negative_guidance=0.0, negative_others=0.0),
                       progress=False).info["history"]["l1"][0]
    same = erase_kpop(tiny_pipe, ERASE, cfg, other_prompts=[[p] for p in ERASE], progress=False)
    assert same.info["history"]["l1"][0] == pytest.approx(2.5 ** 2 * plain, rel=1e-4)
    assert same.settings["other_concept_prompts"]["per_prompt"] == 1
    other = erase_kpop(tiny_pipe, ERASE, cfg, other_prompts=[["a red star"], ["a crimson triangle"]], progress=False)
    assert other.info["history"]["l1"][0] != pytest.approx(2.5 ** 2 * plain, rel=1e-3)
    # one concept (no other prompts) is the own-concept target; missing or ragged lists are refused by name
    own = erase_kpop(tiny_pipe, ERASE, dataclasses.replace(cfg, negative_others=0.0), progress=False)
    alone = erase_kpop(tiny_pipe, ERASE, cfg, other_prompts=[[], []], progress=False)
    assert all(torch.equal(own.weights[k], alone.weights[k]) for k in own.weights)
    with pytest.raises(TrceError, match="negative_others > 0 needs, for every erase prompt"):
        erase_kpop(tiny_pipe, ERASE, cfg, progress=False)
    with pytest.raises(TrceError, match="as many other-concept prompts for every erase prompt; got 1, 2"):
        erase_kpop(tiny_pipe, ERASE, cfg, other_prompts=[["a star"], ["a star", "a cross"]], progress=False)
    with pytest.raises(TrceError, match="KPOP negative_others must be a number >= 0, got -1"):
        KPOPConfig(negative_others=-1)


def _drift(pipe, edit: Edit, prompts: list[str]) -> float:
    """Mean squared change of the UNet's output on `prompts` (fixed z_t, t) that the edit makes."""
    emb, _ = pipe.encode_prompt(prompts, pipe.device, 1, False)
    z = torch.randn((len(prompts), 4, 8, 8), generator=torch.Generator().manual_seed(0))
    t = torch.full((len(prompts),), 500)
    with torch.no_grad():
        before = pipe.unet(z, t, encoder_hidden_states=emb).sample
        with edit.applied(pipe):
            after = pipe.unet(z, t, encoder_hidden_states=emb).sample
    return float((after - before).pow(2).mean())


@pytest.mark.parametrize("where,latents", [("erase", "current"), ("own", "current"), ("own", "cached")])
def test_the_preservation_term_keeps_the_preserved_prompts_outputs(tiny_pipe, where, latents):
    keep = ["a blue square", "a green cross", "a yellow diamond"]
    cfg = KPOPConfig(iterations=6, ddim_steps=2, lr=3e-3, neutral_prompt="a photo", negative_guidance=1.0,
                     preserve_latents=where, latents=latents, cache_trajectories=1)
    with pytest.raises(TrceError, match="preserve_weight=1.0 needs preservation prompts"):
        erase_kpop(tiny_pipe, ERASE, dataclasses.replace(cfg, preserve_weight=1.0), progress=False)
    free = erase_kpop(tiny_pipe, ERASE, cfg, progress=False)
    kept = erase_kpop(tiny_pipe, ERASE, dataclasses.replace(cfg, preserve_weight=10.0), preserve_prompts=keep,
                      progress=False)
    assert kept.settings["preserve_prompts"]["n"] == 3 and "preserve_prompts" not in free.settings
    assert kept.info["history"]["l3"][0] == pytest.approx(0.0, abs=1e-10)  # theta' = theta at iteration 1
    assert _drift(tiny_pipe, kept, keep) < 0.5 * _drift(tiny_pipe, free, keep)
    assert _drift(tiny_pipe, kept, ERASE) > 0  # and the erase prompts still move


def test_max_prompts_takes_a_seeded_subset_of_the_spec_prompts(tiny_pipe):
    import trce

    settings = {"iterations": 1, "ddim_steps": 2, "latents": "current", "batch_size": 1, "max_prompts": 5}
    a = trce.erase(tiny_pipe, "shapeworld-red", method="kpop", kpop=settings, progress=False, use_cache=False)
    b = trce.erase(tiny_pipe, "shapeworld-red", method="kpop", kpop=settings, progress=False, use_cache=False)
    spec_prompts = [p.malicious for p in trce.load_concept("shapeworld-red").pairs()]
    assert len(a.settings["erase_prompts"]) == 5 and a.settings["erase_prompts"] == b.settings["erase_prompts"]
    assert set(a.settings["erase_prompts"]) <= set(spec_prompts)
    with pytest.raises(TrceError, match="max_prompts must be an integer >= 0, got -1"):
        KPOPConfig(max_prompts=-1)
