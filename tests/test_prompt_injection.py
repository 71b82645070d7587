"""Prompt injection through attention processors: exact install/removal, and where it acts (KPOP Table 1);
in cross-attention (SD 1.x) and in the joint attention of MMDiTs (tiny SD3 and FLUX)."""

from __future__ import annotations

import math

import pytest
import torch

from trce.errors import TrceError
from trce.families import family_of
from trce.families.flux import FluxFamily
from trce.families.injection import JointPromptInjectionProcessor, PromptInjectionProcessor, inject
from trce.families.sd3 import joint_blocks_at
from trce.generate import GenSettings, generate
from trce.prompt_injection import injected, site_layers
from trce.testing import tiny_flux_pipeline, tiny_sd3_pipeline

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


# --------------------------------------------------------------------------- joint attention (MMDiT)
JOINT = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}


def _joint_layer(pipe):
    """The first joint block's attention and the keyword arguments it got on one prediction (batch 1)."""
    fam = family_of(pipe)
    attn = pipe.transformer.transformer_blocks[0].attn
    seen: dict = {}
    hook = attn.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    z = torch.randn(1, *fam.latent_shape(pipe), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fam.predict(pipe.transformer, z, torch.tensor([700.0]), fam.encode(pipe, ["a red circle"]))
    hook.remove()
    if "repeated_row" in seen:  # SD3 without T5 predicts with one row for 256 identical ones: as the pipeline feeds it
        index, count = seen.pop("repeated_row")
        c = seen["encoder_hidden_states"]
        seen["encoder_hidden_states"] = torch.cat([c[:, :index], c[:, index:index + 1].expand(-1, count, -1),
                                                   c[:, index + 1:]], 1)
    return attn, seen


def _flux_rotary(pipe, text_rows: int, image_rows: int):
    """FLUX's own rotary tables for `text_rows` rows at txt_ids 0 followed by a square image's rows."""
    side = math.isqrt(image_rows)
    ids = torch.cat([torch.zeros(text_rows, 3), FluxFamily._image_ids(side, side, "cpu")])
    return pipe.transformer.pos_embed(ids)


def _biased(pipe, attn, kw, bias: float):
    """The layer's joint attention with every text key's logit raised by `bias` (both streams' outputs)."""
    x, c = kw["hidden_states"], kw["encoder_hidden_states"]  # (1, n, d), (1, m_c, d)
    if "image_rotary_emb" in kw:  # FLUX: text first; its processor takes an additive mask
        mask = torch.zeros(1, 1, 1, c.shape[1] + x.shape[1])
        mask[..., : c.shape[1]] = bias
        return attn(**kw, attention_mask=mask)
    # SD3: JointAttnProcessor2_0 takes no mask; the same equation written out (image rows first, no qk norm here)
    assert attn.norm_q is None and attn.norm_added_q is None
    n = x.shape[1]
    heads = lambda t: t.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # (1, S, h d_h) -> (1, h, S, d_h)
    q, k, v = (heads(torch.cat([own(x), added(c)], 1)) for own, added in (
        (attn.to_q, attn.add_q_proj), (attn.to_k, attn.add_k_proj), (attn.to_v, attn.add_v_proj)))
    logit_bias = torch.zeros(1, n + c.shape[1])  # (1, S): added to every query's logits
    logit_bias[:, n:] = bias
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=logit_bias)  # (1, h, S, d_h)
    o = o.transpose(1, 2).flatten(2)  # (1, S, d)
    return attn.to_out[0](o[:, :n]), attn.to_add_out(o[:, n:])


@pytest.mark.parametrize("family", JOINT)
def test_joint_no_prompt_is_bit_identical_and_the_processors_come_back(family):
    pipe = JOINT[family]()
    settings = GenSettings(steps=2, guidance=5.0, batch_size=2)
    prompts, seeds = ["a red circle", "a blue star"], [0, 1]
    reference = generate(pipe, prompts, seeds, settings, progress=False)
    original = dict(pipe.transformer.attn_processors)
    width = family_of(pipe).injection_width(pipe)
    with injected(pipe, None, "concat", "all") as slot:
        now = pipe.transformer.attn_processors
        wrapped = {k for k, v in now.items() if isinstance(v, JointPromptInjectionProcessor)}
        # every joint block's attention; FLUX's single-stream blocks never
        assert wrapped == {k for k in original if k.startswith("transformer_blocks.")} and wrapped
        assert all(now[k].inner is original[k] for k in wrapped)
        assert all(now[k] is original[k] for k in original if k not in wrapped)
        assert (generate(pipe, prompts, seeds, settings, progress=False) == reference).all()
        slot.prompt = torch.zeros(1, width)  # add below; here concat: one extra key, not a no-op
        changed = generate(pipe, prompts, seeds, settings, progress=False)  # CFG batch of 4, prompt shared
    assert not (changed == reference).all()
    with injected(pipe, torch.zeros(1, width), "add", "all"):  # C + 0 is C: exactly the original
        assert (generate(pipe, prompts, seeds, settings, progress=False) == reference).all()
    with pytest.raises(RuntimeError), injected(pipe.transformer, torch.zeros(3, width), "concat", "mid"):
        raise RuntimeError("boom")  # restored on error too
    after = pipe.transformer.attn_processors
    assert after.keys() == original.keys() and all(after[k] is original[k] for k in original)
    assert (generate(pipe, prompts, seeds, settings, progress=False) == reference).all()


@pytest.mark.parametrize("family", JOINT)
def test_a_joint_prompt_is_extra_context_rows_whose_outputs_are_dropped(family):
    # the wrapped layer == the original layer run on the context [C; p] (FLUX: with the model's own rotary
    # tables for m_c + m_p text rows at position 0), with the context output cut back to the m_c rows of C
    pipe = JOINT[family]()
    attn, kw = _joint_layer(pipe)
    c = kw["encoder_hidden_states"]  # (1, m_c, d)
    p = torch.randn(3, c.shape[-1], generator=torch.Generator().manual_seed(1))
    longer = {**kw, "encoder_hidden_states": torch.cat([c, p[None]], 1)}  # (1, m_c + 3, d)
    if "image_rotary_emb" in kw:
        n = kw["hidden_states"].shape[1]
        assert all(torch.equal(a, b) for a, b in zip(_flux_rotary(pipe, c.shape[1], n), kw["image_rotary_emb"]))
        longer["image_rotary_emb"] = _flux_rotary(pipe, c.shape[1] + 3, n)
    with torch.no_grad():
        with injected(pipe, p, "concat", "mid"):
            image, context = attn(**kw)
        image_ref, context_ref = attn(**longer)
    assert image.shape == kw["hidden_states"].shape and context.shape == c.shape
    torch.testing.assert_close(image, image_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(context, context_ref[:, : c.shape[1]], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", JOINT)
def test_copies_of_the_context_raise_the_text_logits_by_log_k_plus_1(family):
    # In cross-attention k copies of C are a no-op (every key copied alike). In joint attention the image keys
    # are not copied: n identical keys are one key at logit + log n, so the copies raise every query's logits
    # on the text keys by log(k + 1). That is what holds, for both streams' outputs.
    pipe = JOINT[family]()
    attn, kw = _joint_layer(pipe)
    c, k = kw["encoder_hidden_states"], 3
    with torch.no_grad():
        base = attn(**kw)
        with injected(pipe, c[0].repeat(k, 1), "concat", "mid"):
            copied = attn(**kw)
        plain, raised = _biased(pipe, attn, kw, 0.0), _biased(pipe, attn, kw, math.log(k + 1))
    for ours, theirs in zip(plain, base):  # the reference is the layer's own attention
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(copied[0], base[0], rtol=1e-3, atol=1e-4)  # not a no-op here
    for ours, theirs in zip(copied, raised):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_joint_sites_are_the_middle_block_onwards_or_all():
    from diffusers import SD3Transformer2DModel

    for n, mid, mid_up in ((5, [2], [2, 3, 4]), (4, [1, 2], [1, 2, 3]), (1, [0], [0])):
        assert list(joint_blocks_at(n, "mid")) == mid and list(joint_blocks_at(n, "mid+up")) == mid_up
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=n, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
            pos_embed_max_size=16)
        for sites, blocks in (("mid", mid), ("mid+up", mid_up), ("all", list(range(n)))):
            assert site_layers(transformer, sites) == [f"transformer_blocks.{i}.attn.processor" for i in blocks]
    flux = tiny_flux_pipeline()  # one joint and one single-stream block: every site is the joint block
    assert {s: site_layers(flux, s) for s in ("mid", "all")} == {s: ["transformer_blocks.0.attn.processor"]
                                                                 for s in ("mid", "all")}


@pytest.mark.parametrize("family", JOINT)
def test_joint_bad_values_are_named(family):
    pipe = JOINT[family]()
    attn, kw = _joint_layer(pipe)
    text = family_of(pipe).text_width(pipe)
    with pytest.raises(TrceError, match=f"width {text} but the context rows .* have width 16"), \
            injected(pipe, torch.zeros(2, text), "concat", "mid"), torch.no_grad():
        attn(**kw)
    with pytest.raises(TrceError, match="7 tokens"), injected(pipe, torch.zeros(7, 16), "add", "mid"), \
            torch.no_grad():
        attn(**kw)
    assert not any(isinstance(v, PromptInjectionProcessor) for v in pipe.transformer.attn_processors.values())
