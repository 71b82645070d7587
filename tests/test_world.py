import re

import numpy as np
import pytest

from trce.shapeworld import world


def test_render_is_deterministic_from_seed():
    a = [world.render(world.sample_scene(np.random.default_rng(7))) for _ in range(2)]
    assert a[0].shape == (32, 32, 3) and a[0].dtype == np.uint8
    assert np.array_equal(a[0], a[1])
    other = world.render(world.sample_scene(np.random.default_rng(8)))
    assert not np.array_equal(a[0], other)


def test_world_has_the_required_variety():
    v = world.vocab()
    assert len(v.values("shape")) >= 6 and len(v.values("color")) >= 6
    assert len(v.values("pattern")) >= 3 and len(v.values("background")) >= 3
    assert {"solid", "striped", "dotted"} <= set(v.values("pattern"))
    assert len(v.templates) >= 10


@pytest.mark.parametrize("attribute", ["color", "shape", "pattern"])
def test_every_value_has_synonyms_and_paraphrases_split_in_groups(attribute):
    v = world.vocab()
    all_words = {}
    for value in v.values(attribute):
        syn = v.expressions(attribute, value, "synonym")
        para = v.expressions(attribute, value, "paraphrase")
        assert len(syn) >= 4 and all(" " not in s for s in syn), value
        assert len(para) >= 2 and all(" " in p for p in para), value
        for group in ("spec", "heldout"):
            assert v.expressions(attribute, value, "synonym", group), (value, group)
            assert v.expressions(attribute, value, "paraphrase", group), (value, group)
        assert not set(v.expressions(attribute, value, "synonym", "spec")) & set(
            v.expressions(attribute, value, "synonym", "heldout"))
        # a paraphrase never names its value, by keyword or synonym
        for p in para:
            words = set(re.findall(r"[a-z]+", p))
            assert value not in words and not words & set(syn), (value, p)
        for s in syn + [value]:
            assert s not in all_words, f"{s!r} names both {all_words.get(s)} and {value}"
            all_words[s] = value


def test_pinned_attributes_are_honoured_and_bad_values_refused():
    rng = np.random.default_rng(0)
    scene = world.sample_scene(rng, color="red", shape="star")
    assert (scene.color, scene.shape) == ("red", "star")
    with pytest.raises(ValueError, match="unknown color 'teal'"):
        world.sample_scene(rng, color="teal")


def test_shapes_differ_and_stay_inside_the_canvas():
    rng = np.random.default_rng(3)
    masks = {}
    for shape in world.vocab().values("shape"):
        scene = world.Scene(shape=shape, color="red", pattern="solid", background="black", radius=12, cx=16, cy=16,
                            tint=(0, 0, 0))
        img = world.render(scene)
        masks[shape] = img[..., 0] > 100
        assert masks[shape].sum() > 60, shape
        assert not masks[shape][0].any() and not masks[shape][-1].any(), shape
    shapes = list(masks)
    for i, a in enumerate(shapes):
        for b in shapes[i + 1:]:
            assert (masks[a] ^ masks[b]).sum() > 20, (a, b)
    assert rng is not None


def test_caption_styles_name_what_they_say():
    rng = np.random.default_rng(1)
    v = world.vocab()
    for form in world.FORMS:
        for _ in range(20):
            scene = world.sample_scene(rng)
            text, named = world.describe(scene, rng, world.fixed_style(form, "heldout"))
            assert set(named) == set(world.ATTRIBUTES)
            expressions = v.expressions("color", scene.color, form, "all" if form == "keyword" else "heldout")
            assert any(e in text for e in expressions), (form, text)
    assert world.caption(world.sample_scene(rng), rng)
