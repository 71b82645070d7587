"""Prompt injection through attention processors: exact install/removal, and where it acts (KPOP Table 1)."""

from __future__ import annotations

import pytest
import torch

from trce.errors import TrceError
from trce.generate import GenSettings, generate
from trce.prompt_injection import PromptInjectionProcessor, inject, injected, site_layers

EXPECTED = {  # the tiny UNet: cross-attention in down_blocks.0, the mid block and up_blocks.1
    "mid": {"mid_block"},
    "mid+up": {"mid_block", "up_blocks"},
    "all": {"mid_block", "up_blocks", "down_blocks"},
}


def _inputs(pipe, n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, 8, 8, generator=g)
    emb, _ = pipe.encode_prompt(["a red circle", "a blue star"][:n], "cpu", 1, False)
    return z, torch.tensor([700, 300])[:n], emb


def _out(pipe, z, t, emb, **kw):
    with torch.no_grad():
        return pipe.unet(z, t, encoder_hidden_states=emb, **kw).sample


def _prompt(pipe, tokens: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(tokens, pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(seed))


def test_install_and_removal_restore_the_same_processor_objects(tiny_pipe):
    z, t, emb = _inputs(tiny_pipe)
    before = _out(tiny_pipe, z, t, emb)
    original = dict(tiny_pipe.unet.attn_processors)
    with injected(tiny_pipe, _prompt(tiny_pipe), "concat", "all"):
        now = tiny_pipe.unet.attn_processors
        wrapped = {k for k, v in now.items() if isinstance(v, PromptInjectionProcessor)}
        assert wrapped == set(site_layers(tiny_pipe, "all")) and all(".attn2." in k for k in wrapped)
        assert all(now[k] is original[k] for k in original if k not in wrapped)  # others keep their objects
        assert all(now[k].inner is original[k] for k in wrapped)
    with pytest.raises(RuntimeError), injected(tiny_pipe.unet, _prompt(tiny_pipe), "add", "mid"):
        raise RuntimeError("boom")  # restored on error too
    after = tiny_pipe.unet.attn_processors
    assert after.keys() == original.keys() and all(after[k] is original[k] for k in original)
    assert torch.equal(_out(tiny_pipe, z, t, emb), before)


@pytest.mark.parametrize("mode", ["concat", "add"])
def test_no_prompt_is_bit_identical_also_through_the_pipeline_with_cfg(tiny_pipe, mode):
    settings = GenSettings(steps=2, guidance=5.0, batch_size=2)
    prompts, seeds = ["a red circle", "a blue star"], [0, 1]
    reference = generate(tiny_pipe, prompts, seeds, settings, progress=False)
    with injected(tiny_pipe, None, mode, "all") as slot:
        assert slot.prompt is None
        assert (generate(tiny_pipe, prompts, seeds, settings, progress=False) == reference).all()
        slot.prompt = _prompt(tiny_pipe, 32 if mode == "add" else 5)
        changed = generate(tiny_pipe, prompts, seeds, settings, progress=False)  # CFG batch of 4, prompt shared
    assert not (changed == reference).all()
    assert (generate(tiny_pipe, prompts, seeds, settings, progress=False) == reference).all()


def test_zero_additive_prompt_is_exactly_the_original(tiny_pipe):
    z, t, emb = _inputs(tiny_pipe)
    base = _out(tiny_pipe, z, t, emb)
    for tokens in (emb.shape[1], 1):
        with injected(tiny_pipe, torch.zeros(tokens, emb.shape[-1]), "add", "all"):
            assert torch.equal(_out(tiny_pipe, z, t, emb), base)


@pytest.mark.parametrize("sites", ["mid", "mid+up", "all"])
def test_injection_changes_only_the_cross_attention_layers_at_its_sites(tiny_pipe, sites):
    z, t, emb = _inputs(tiny_pipe)
    unet = tiny_pipe.unet
    attn = {name: m for name, m in unet.named_modules() if name.endswith(("attn1", "attn2"))}
    seen: dict[str, tuple] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, k, name=name: seen.setdefault(name, (a, k)), with_kwargs=True)
             for name, m in attn.items()]
    _out(tiny_pipe, z, t, emb)
    for h in hooks:
        h.remove()

    def run(name):
        args, kwargs = seen[name]
        with torch.no_grad():
            return attn[name](*args, **kwargs)

    plain = {name: run(name) for name in attn}
    with injected(tiny_pipe, _prompt(tiny_pipe), "concat", sites):
        changed = {name for name in attn if not torch.equal(run(name), plain[name])}
    assert changed == {n for n in attn if n.endswith("attn2") and n.split(".")[0] in EXPECTED[sites]}


def test_the_prompt_is_shared_across_the_batch(tiny_pipe):
    z, t, emb = _inputs(tiny_pipe)
    p = _prompt(tiny_pipe)
    with injected(tiny_pipe, p, "concat", "mid+up"):
        both = _out(tiny_pipe, z, t, emb)
        one = [_out(tiny_pipe, z[i : i + 1], t[i : i + 1], emb[i : i + 1]) for i in range(2)]
    torch.testing.assert_close(both, torch.cat(one), rtol=1e-4, atol=1e-5)


def test_concatenating_the_text_itself_is_a_no_op(tiny_pipe):
    # softmax over duplicated keys gives the same weights to the same values (paper: "with p = c ...")
    z, t, emb = _inputs(tiny_pipe, n=1)
    base = _out(tiny_pipe, z, t, emb)
    with injected(tiny_pipe, emb[0].repeat(3, 1), "concat", "all"):
        torch.testing.assert_close(_out(tiny_pipe, z, t, emb), base, rtol=1e-4, atol=1e-5)


def test_one_additive_vector_broadcasts_like_its_repetition(tiny_pipe):
    z, t, emb = _inputs(tiny_pipe)
    v = _prompt(tiny_pipe, 1)
    with injected(tiny_pipe, v, "add", "mid") as slot:
        single = _out(tiny_pipe, z, t, emb)
        slot.prompt = v.repeat(emb.shape[1], 1)
        torch.testing.assert_close(_out(tiny_pipe, z, t, emb), single, rtol=0, atol=0)


def test_an_all_ones_attention_mask_matches_no_mask(tiny_pipe):
    z, t, emb = _inputs(tiny_pipe)
    mask = torch.ones(emb.shape[:2])
    with injected(tiny_pipe, _prompt(tiny_pipe), "concat", "all"):
        torch.testing.assert_close(_out(tiny_pipe, z, t, emb, encoder_attention_mask=mask), _out(tiny_pipe, z, t, emb))
    context, padded = inject(emb, _prompt(tiny_pipe, 3), "concat", torch.zeros(2, 1, emb.shape[1]))
    assert context.shape == (2, emb.shape[1] + 3, emb.shape[2]) and padded.shape == (2, 1, emb.shape[1] + 3)


def test_bad_values_are_named(tiny_pipe):
    z, t, emb = _inputs(tiny_pipe)
    with pytest.raises(TrceError, match="'middle'"), injected(tiny_pipe, None, "concat", "middle"):
        pass
    with pytest.raises(TrceError, match="'prefix'"), injected(tiny_pipe, None, "prefix", "mid"):
        pass
    with pytest.raises(TrceError, match="7 tokens"), injected(tiny_pipe, _prompt(tiny_pipe, 7), "add", "mid"):
        _out(tiny_pipe, z, t, emb)
    with pytest.raises(TrceError, match="width 5"), injected(tiny_pipe, torch.zeros(4, 5), "concat", "mid"):
        _out(tiny_pipe, z, t, emb)
    with pytest.raises(TrceError, match=r"\(2, 3, 32\)"), injected(tiny_pipe, torch.zeros(2, 3, 32), "concat", "mid"):
        pass
    assert all(not isinstance(p, PromptInjectionProcessor) for p in tiny_pipe.unet.attn_processors.values())
