"""The open caption language: split spec/heldout like the words, erasure specs never see a held-out form, captions
fit the text encoder, and the held-out-template suite groups name what they should."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from trce.concepts import builtin_specs, load_spec
from trce.eval.suites import OPEN_GROUPS, load_suite
from trce.shapeworld import world
from trce.shapeworld.language import OpenStyle, draft, open_caption, training_caption
from trce.shapeworld.lexicon import language
from trce.shapeworld.tokenizer import build_tokenizer

WORD = re.compile(r"[a-z]+")


def _words(texts) -> set[str]:
    return {w for t in texts for w in WORD.findall(t.lower().replace("{x}", " ").replace("{o}", " "))}


def _heldout_only() -> set[str]:
    """Words that only the held-out half of the language (and of the vocabulary) uses."""
    lang = language()
    held = [*lang.frames("heldout"), *lang.openings("heldout"), *lang.closings("heldout"),
            *lang.intensifiers("heldout")]
    spec = [*lang.frames("spec"), *lang.openings("spec"), *lang.closings("spec"), *lang.intensifiers("spec"),
            *world.vocab().templates]
    for attribute in ("color", "shape", "pattern", "background"):
        held += [c.text for c in lang.constructions(attribute, "heldout")]
        spec += [c.text for c in lang.constructions(attribute, "spec")]
    v = world.vocab()
    for attribute in world.ATTRIBUTES:
        for value in v.values(attribute):
            spec.append(value)
            for form in ("synonym", "paraphrase"):
                spec += v.expressions(attribute, value, form, "spec" if attribute != "background" else "all")
                if attribute != "background":
                    held += v.expressions(attribute, value, form, "heldout")
            if attribute == "color":
                spec += lang.objects(value, "spec")
                held += lang.objects(value, "heldout")
    return _words(held) - _words(spec)


def test_every_list_is_split_into_spec_and_heldout():
    raw = language().raw
    for key in ("frames", "openings", "closings", "writing", "intensifiers"):
        assert set(raw[key]) == {"spec", "heldout"} and raw[key]["spec"] and raw[key]["heldout"], key
    for value, objects in raw["objects"].items():
        assert objects["spec"] and objects["heldout"] and not set(objects["spec"]) & set(objects["heldout"]), value
    for attribute, groups in raw["constructions"].items():
        assert set(groups) == {"spec", "heldout"}, attribute
        specs = {c.text for c in language().constructions(attribute, "spec")}
        assert specs and not specs & {c.text for c in language().constructions(attribute, "heldout")}, attribute
    assert {"whose", "hued", "colour"} <= _heldout_only()


def test_every_word_is_one_token_and_captions_fit_the_text_encoder():
    tok = build_tokenizer()
    for word in _words(language().all_text()):
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    rng = np.random.default_rng(0)
    for _ in range(400):
        scene = world.sample_scene(rng)
        text, named = training_caption(scene, rng)
        assert len(tok(text).input_ids) <= tok.model_max_length, text
        assert set(named) <= set(world.ATTRIBUTES)


def test_casing_and_punctuation_change_no_meaning():
    tok = build_tokenizer()
    assert tok("A RED STAR!!!").input_ids[:4] == tok("a red star").input_ids[:4]


@pytest.mark.parametrize("name", ["shapeworld-red", "shapeworld-star", "shapeworld-striped", "shapeworld-3shapes"])
def test_erasure_specs_use_spec_forms_only(name):
    spec = load_spec(name)
    if not spec.open:
        spec = dataclasses.replace(spec, open=6)
    pairs = spec.pairs()
    assert len(pairs) > len(spec.expressions) * len(spec.templates) * spec.contexts  # the open-language pairs too
    heldout = _heldout_only()
    for p in pairs:
        leaked = _words([p.malicious, p.safe]) & heldout
        assert not leaked, (p.malicious, leaked)
        assert p.malicious[p.m_span[0]:p.m_span[1]] and p.safe[p.s_span[0]:p.s_span[1]].lower() == p.target
    for prompt in spec.preservation_prompts():
        assert not _words([prompt]) & heldout, prompt


def test_the_safe_side_drops_the_construction_and_the_other_concepts_fill_it():
    spec = dataclasses.replace(load_spec("shapeworld-3shapes"), open=4)
    from trce.concepts import other_concept_prompts

    table = other_concept_prompts(spec)
    opened = [p for p in spec.pairs() if p.construction != "{x}"]
    assert opened
    for p in opened:
        assert p.expression in p.malicious.lower() and p.expression not in p.safe.lower()
        for other in table[p.malicious]:  # the same construction, naming another erased shape
            assert other != p.malicious and p.expression not in other.lower()


def test_the_held_out_template_groups_name_the_value_in_held_out_constructions():
    suite = load_suite("shapeworld-red")
    rows = [r for r in suite.rows(limit=40) if r.category in OPEN_GROUPS]
    assert {r.category for r in rows} == set(OPEN_GROUPS)
    heldout = _heldout_only()
    with_heldout_words = sum(bool(_words([r.prompt]) & heldout) for r in rows)
    assert with_heldout_words > 0.8 * len(rows)
    for r in rows:
        assert set(r.extra["named"]) >= {"color", "shape"}
        if r.category == "preserve-open":
            assert r.extra["value"] != "red" and r.extra["named"]["color"] == r.extra["value"]
        else:
            expr = r.extra["expression"].lower()
            bare = re.sub(r"^(a|an|the) ", "", expr).replace(" ", "-")  # "{ob}-colour": "fire-truck-colour"
            assert r.extra["value"] == "red" and (expr in r.prompt.lower() or bare in r.prompt.lower())
    forms = {r.extra["form"] for r in rows if r.category == "keyword-open"}
    assert forms == {"keyword", "synonym", "paraphrase", "object"}
    synonyms = {r.extra["expression"] for r in rows if r.category == "synonym-open"}
    assert synonyms <= set(world.vocab().expressions("color", "red", "synonym", "heldout"))


def test_open_captions_come_in_every_kind_the_issue_lists():
    rng = np.random.default_rng(3)
    texts = [open_caption(world.sample_scene(rng), rng)[0].lower() for _ in range(600)]
    joined = "\n".join(texts)
    for needle in ("that is ", "-colored", "the colour of", "as red as" if "as red as" in joined else " as ",
                   "whose color is", "!!!", "4k masterpiece", "an image"):
        assert needle in joined, needle
    assert any(t.count(",") >= 2 for t in texts)  # stacked modifiers
    assert max(len(t.split()) for t in texts) >= 20  # long prompts
    d = draft(world.sample_scene(rng, color="red"), rng, OpenStyle(group="heldout"), slot="color",
              slot_expr=("keyword", "red"))
    assert "red" in d.render(d.slot_text())[0].lower() and "red" not in d.render("")[0].lower()
    assert all(s.name for s in builtin_specs().values())
