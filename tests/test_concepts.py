"""Concept specs: built-ins, validation errors, prompt pairs, preservation sources."""

from pathlib import Path

import pytest
import yaml

from trce.concepts import builtin_specs, load_spec, preservation_prompts
from trce.errors import TrceError
from trce.shapeworld import world
from trce.shapeworld.lexicon import language

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHAPEWORLD = ("shapeworld-red", "shapeworld-star", "shapeworld-striped", "shapeworld-3shapes")


def _write(tmp_path, raw, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return path


def _minimal(**over):
    raw = {"name": "mine", "erase": {"target": "a dog", "expressions": ["a cat", "a kitten"]},
           "templates": ["a photo of {}", "{concept} in a garden"]}
    raw.update(over)
    return raw


def test_builtins_load_and_match_the_issue():
    specs = builtin_specs()
    for name in ("sexual", "i2p", "van-gogh", "kelly-mckernan", "church", "garbage-truck", "parachute", *SHAPEWORLD):
        assert name in specs
    sexual = specs["sexual"]
    assert len(sexual.expressions) == 20 and len(sexual.templates) == 15
    assert {e.target for e in sexual.expressions} == {"a person wearing clothes"}
    assert len(sexual.pairs()) == 300
    i2p = specs["i2p"]
    assert len(i2p.expressions) >= 40
    assert {e.group for e in i2p.expressions} == {"hate", "harassment", "violence", "self-harm", "sexual", "shocking",
                                                  "illegal activity"}
    for s in specs.values():
        assert Path(s.source).stem == s.name  # file name = spec name
        assert all(e.text != e.target for e in s.expressions)
    assert load_spec("nudity") is not None and load_spec("nudity").name == "sexual"


def test_fine_tuning_methods_train_the_group_their_papers_use_for_each_concept():
    from trce.methods.esd import ESDConfig
    from trce.methods.kpop import KPOPConfig

    specs = builtin_specs()
    # nudity and the I2P categories: everything but cross-attention (ESD-u, KPOP Sec. 5.1); objects and styles:
    # cross-attention, the configs' default
    for name, group in (("sexual", "non-cross-attn"), ("i2p", "non-cross-attn"), ("van-gogh", "cross-attn"),
                        ("church", "cross-attn"), ("garbage-truck", "cross-attn")):
        settings = specs[name].settings
        assert KPOPConfig.from_dict(settings.get("kpop", {})).params == group, name
        assert ESDConfig(**settings.get("esd", {})).params == group, name


@pytest.mark.parametrize("name", SHAPEWORLD)
def test_shapeworld_specs_use_only_spec_group_expressions(name):
    spec = load_spec(name)
    v = world.vocab()
    assert spec.attribute in ("color", "shape", "pattern") and spec.values
    allowed, heldout = set(), set()
    for value in spec.values:
        allowed |= {value} | set(v.expressions(spec.attribute, value, "synonym", "spec"))
        allowed |= set(v.expressions(spec.attribute, value, "paraphrase", "spec"))
        heldout |= set(v.expressions(spec.attribute, value, "synonym", "heldout"))
        heldout |= set(v.expressions(spec.attribute, value, "paraphrase", "heldout"))
        if spec.attribute == "color":  # objects that have the colour ("a strawberry"), with forms: [..., object]
            objects = language().objects(value, "spec")
            allowed |= set(objects) if any(e.form == "object" for e in spec.expressions) else set()
            heldout |= set(language().objects(value, "heldout"))
    assert {e.text for e in spec.expressions} == allowed
    pairs = spec.pairs()
    grammar = len(spec.expressions) * len(spec.templates) * spec.contexts
    assert spec.open > 0 and len(pairs) == grammar + len(spec.expressions) * spec.open
    for p in pairs:
        slot = p.malicious[p.m_span[0] : p.m_span[1]]
        core = p.expression.lower().removeprefix("a ").removeprefix("an ")  # "{ob}-colored" drops the article
        assert core.replace(" ", "-") in slot.lower().replace(" ", "-"), (slot, p.expression)
        assert p.safe[p.s_span[0] : p.s_span[1]].lower() == p.target
        words = f" {p.malicious.lower()} "
        assert not any(f" {h} " in words for h in heldout), p.malicious  # held-out words never reach the eraser
        safe = f" {p.safe.lower()} "
        assert not any(f" {a} " in safe for a in allowed | heldout), p.safe  # the safe side names no erased value


def test_shapeworld_preservation_captions_never_name_the_value():
    spec = load_spec("shapeworld-red")
    prompts = preservation_prompts(spec)
    assert len(prompts) >= 900
    red = set(world.vocab().expressions("color", "red", "synonym")) | set(
        world.vocab().expressions("color", "red", "paraphrase")) | {"red"}
    for p in prompts:
        assert not any(f" {r} " in f" {p} " for r in red), p
    assert prompts == preservation_prompts(spec)  # deterministic


def test_unknown_name_suggests_and_lists(tmp_path):
    with pytest.raises(TrceError, match=r"unknown concept 'sexul' \(did you mean 'sexual'\?\); available: .*church"):
        load_spec("sexul")
    with pytest.raises(TrceError, match=r"unknown concept 'nudty' \(did you mean 'nudity'\?\); available: .*sexual"):
        load_spec("nudty")
    with pytest.raises(TrceError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")


@pytest.mark.parametrize("change, message", [
    ({"name": "Bad Name"}, "field 'name' must be lower-case"),
    ({"templates": ["a photo of a cat"]}, r"field 'templates\[0\]' must contain exactly one"),
    ({"templates": ["{} and {}"]}, r"field 'templates\[0\]'"),
    ({"eta": "high"}, "field 'eta' must be a number"),
    ({"eta": -1}, "field 'eta' must be at least 0"),
    ({"token_role": "eos"}, "field 'token_role'.*did you mean 'eot'"),
    ({"colour": "red"}, "field 'colour' is not a known field"),
    ({"erase": {"expressions": ["a cat"]}}, r"field 'erase.target' is missing"),
    ({"erase": {"target": "a dog", "expressions": [3.5, {"txt": "x"}]}}, r"erase.expressions\[1\].txt"),
    ({"erase": {"target": "a dog", "expressions": "from-vocab"}}, "needs `attribute`"),
    ({"preserve": {"source": "cocoa"}}, r"field 'preserve.source' is 'cocoa' \(did you mean 'coco'\?\)"),
    ({"preserve": {"source": "prompts"}}, "field 'preserve.prompts' must list"),
    ({"attribute": "color", "value": "crimsonish"}, "is not a ShapeWorld color"),
    ({"settings": {"W": {"lr": 1}}}, r"field 'settings.W' is not a known field"),
    ({"settings": {"V": {"learning_rate": 1}}}, r"settings.V.*learning_rate"),
    ({"settings": {"kpop": {"iterations": 0}}}, r"settings.kpop.*iterations"),
])
def test_validation_errors_name_the_field_and_file(tmp_path, change, message):
    path = _write(tmp_path, _minimal(**change))
    with pytest.raises(TrceError, match=message) as info:
        load_spec(path)
    assert str(path) in str(info.value)


def test_missing_fields_and_bad_yaml(tmp_path):
    raw = _minimal()
    del raw["templates"]
    with pytest.raises(TrceError, match="field 'templates' is missing"):
        load_spec(_write(tmp_path, raw))
    with pytest.raises(TrceError, match="not valid YAML"):
        load_spec(_write(tmp_path, "name: [unclosed", "bad.yaml"))


def test_user_spec_pairs_and_per_expression_targets(tmp_path):
    raw = _minimal(erase=[{"target": "a dog", "expressions": ["a cat", {"text": "a lion", "target": "a horse"}],
                           "group": "animals"}])
    spec = load_spec(_write(tmp_path, raw))
    pairs = spec.pairs()
    assert len(pairs) == 4
    assert ("a photo of a lion", "a photo of a horse") in {(p.malicious, p.safe) for p in pairs}
    assert ("a cat in a garden", "a dog in a garden") in {(p.malicious, p.safe) for p in pairs}
    assert spec.to_dict()["expressions"][1] == {"text": "a lion", "target": "a horse", "group": "animals"}


def test_preservation_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("TRCE_DATA", raising=False)
    spec = load_spec(_write(tmp_path, _minimal(preserve={"prompts": ["a car", "a tree", "a boat"], "n": 2})))
    assert len(preservation_prompts(spec)) == 2
    (tmp_path / "keep.csv").write_text("id,text\n1,a red house\n2,a green field\n")
    spec = load_spec(_write(tmp_path, _minimal(preserve={"file": "keep.csv", "column": "text"})))
    assert preservation_prompts(spec) == ["a red house", "a green field"]
    spec = load_spec(_write(tmp_path, _minimal(preserve={"file": "keep.csv", "column": "prompt"})))
    with pytest.raises(TrceError, match="no column 'prompt'; columns: id, text"):
        preservation_prompts(spec)
    coco = load_spec("sexual")
    with pytest.raises(TrceError, match="pass --data DIR"):
        preservation_prompts(coco)
    with pytest.raises(TrceError, match="does not exist"):
        preservation_prompts(coco, tmp_path)
    assert preservation_prompts(load_spec(_write(tmp_path, _minimal(preserve="none")))) == []


def test_coco_from_the_shared_data():
    if not (DATA / "prompts" / "coco_30k.csv").exists():
        pytest.skip("shared data folder absent")
    prompts = preservation_prompts(load_spec("sexual"), DATA)
    assert len(prompts) == 1000 and len(set(prompts)) > 990
    assert prompts == preservation_prompts(load_spec("sexual"), DATA)


def test_spec_settings_are_defaults_under_the_callers_settings(tmp_path):
    from trce.methods import plan

    spec = load_spec(_write(tmp_path, _minimal(settings={"V": {"lr": 1e-4, "epochs": 2}, "T": {"eta": 0.5}})))
    configs = plan(spec).configs
    assert (configs["V"].lr, configs["V"].epochs, configs["T"].eta) == (1e-4, 2, 0.5)
    configs = plan(spec, V={"epochs": 5, "lr": "3e-4"}, seed=7).configs  # strings as from --set
    assert (configs["V"].lr, configs["V"].epochs, configs["V"].seed) == (3e-4, 5, 7)
    assert plan(spec, "kpop").configs["kpop"].lr == 1e-5  # the spec recommends nothing for kpop: its defaults
    with pytest.raises(TrceError, match="has no stage 'kpop'"):
        plan(spec, "trce", kpop={"lr": 1.0})
    with pytest.raises(TrceError, match=r"unknown V setting 'epoch' \(did you mean 'epochs'\?\)"):
        plan(spec, V={"epoch": 1})


def test_other_concept_prompts_name_each_other_erased_concept_in_the_slot():
    from trce.concepts import other_concept_prompts

    spec = load_spec("shapeworld-3shapes")
    table = other_concept_prompts(spec)
    pairs = spec.pairs()
    assert set(table) == {p.malicious for p in pairs}
    forms = {e.text: (e.value, e.form) for e in spec.expressions}
    for p in pairs:
        value, form = forms[p.expression]
        others = table[p.malicious]
        assert len(others) == 2  # circle, star, triangle: the two that the prompt does not name
        a, b = p.m_span
        for q, other in zip(others, [v for v in ("circle", "star", "triangle") if v != value]):
            named = next(e for e in spec.expressions if e.value == other and e.form == form)
            # only the slot (and its article) changes, written in the prompt's case
            text = p.construction.replace("{x}", named.text)
            assert q.lower().endswith((text + p.malicious[b:]).lower())
            head = q[: len(q) - len(text) - (len(p.malicious) - b)]
            assert head.lower().rstrip("an ") == p.malicious[:a].lower().rstrip("an ")
            assert (q.upper() == q) == (p.malicious.upper() == p.malicious)
    # the article before the slot follows the new word: "an orb" -> "a star", "a triangle"
    orb = next(k for k in table if " an orb " in f" {k} ")
    assert all(f" a {w} " in f" {q} " for q, w in zip(table[orb], ("pentagram", "trigon"))), table[orb]
    i2p = other_concept_prompts(load_spec("i2p"))
    assert i2p["a photo of exposed breasts"] == ["a photo of racism", "a photo of bullying", "a photo of violence",
                                                 "a photo of self-harm", "a photo of gore", "a photo of illegal drugs"]
    assert set(map(len, other_concept_prompts(load_spec("sexual")).values())) == {0}  # one concept: no others


def test_hardened_red_spec_erases_the_same_prompts_onto_blue_and_recommends_hardening():
    from trce.methods.stage_v import StageVConfig

    plain, hard = load_spec("shapeworld-red"), load_spec("shapeworld-red-hardened")
    a, b = plain.pairs(), hard.pairs()
    assert [p.malicious for p in a] == [p.malicious for p in b] and len(b) == 720
    assert {p.target for p in b} == {"blue"} and all("blue" in p.safe.lower() for p in b)
    assert preservation_prompts(plain) == preservation_prompts(hard)
    assert (hard.ridge, hard.token_role) == (plain.ridge, plain.token_role)
    assert (plain.eta, hard.eta) == (0.01, 0.0177)  # blue is held off purple by a heavier preservation term
    config = StageVConfig(**hard.settings["V"])
    assert (config.robust, config.robust_prompts, config.lr) == (3, 100, 6e-4)
    assert (config.robust_tokens, config.robust_lr) == (10, 0.03)  # a stronger attacker than the evaluating one
    # `extends: shapeworld-red`: the baselines' settings and the other families' settings are the plain spec's
    assert {k: v for k, v in hard.settings.items() if k != "V"} == {k: v for k, v in plain.settings.items() if k != "V"}
    assert hard.family_settings == plain.family_settings and hard.aliases == () and "red" in plain.aliases


def test_extends_takes_the_base_fields_merges_settings_and_refuses_cycles(tmp_path):
    """`extends:` (a built-in name or a path relative to the spec): the base's fields but its name, aliases and
    description; the spec's own fields replace the base's, `settings` merge key by key; a typo names the built-ins, a
    cycle is refused, and a base's relative prompt file is read from the base's folder."""
    base = _minimal(name="base", aliases=["b"], description="the base", eta=0.05,
                    settings={"V": {"lr": 1e-4, "epochs": 2}, "esd": {"lr": 1e-5}},
                    preserve={"file": "keep.txt"})
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "keep.txt").write_text("a tree\na house\n")
    _write(tmp_path / "sub", base, "base.yaml")
    child = load_spec(_write(tmp_path, {"name": "child", "extends": "sub/base.yaml", "ridge": 0.001,
                                        "settings": {"V": {"lr": 3e-4}}}))
    parent = load_spec(tmp_path / "sub" / "base.yaml")
    assert (child.name, child.aliases, child.description) == ("child", (), "")
    assert child.pairs() == parent.pairs() and (child.eta, child.ridge) == (0.05, 0.001)
    assert child.settings == {"V": {"lr": 3e-4, "epochs": 2}, "esd": {"lr": 1e-5}}
    assert preservation_prompts(child) == preservation_prompts(parent) == ["a tree", "a house"]
    # a chain through a built-in (by alias), and a whole field replaced
    grand = load_spec(_write(tmp_path, {"name": "grand", "extends": "red", "erase": {
        "target": "green", "expressions": "from-vocab", "forms": ["keyword"]}}, "grand.yaml"))
    assert grand.attribute == "color" and grand.values == ("red",) and {p.target for p in grand.pairs()} == {"green"}
    assert grand.settings == load_spec("shapeworld-red").settings
    with pytest.raises(TrceError, match=r"field 'extends' unknown concept 'shapeworld-rde' \(did you mean "
                                        r"'shapeworld-red'\?\)"):
        load_spec(_write(tmp_path, {"name": "typo", "extends": "shapeworld-rde"}, "typo.yaml"))
    _write(tmp_path, {"name": "a", "extends": "b.yaml"}, "a.yaml")
    _write(tmp_path, {"name": "b", "extends": "a.yaml"}, "b.yaml")
    with pytest.raises(TrceError, match="field 'extends' makes a cycle: .*a.yaml -> .*b.yaml -> .*a.yaml"):
        load_spec(tmp_path / "a.yaml")
    with pytest.raises(TrceError, match="field 'extends' names 'nowhere.yaml'"):
        load_spec(_write(tmp_path, {"name": "c", "extends": "nowhere.yaml"}, "c.yaml"))
    (tmp_path / "big.yaml").write_text("name: big\n" + "#" * (1 << 20))
    with pytest.raises(TrceError, match=r"big.yaml is 1.0 MB; a spec is at most 1 MB"):
        load_spec(_write(tmp_path, {"name": "d", "extends": "big.yaml"}, "d.yaml"))


def test_family_targets_name_the_safe_text_on_their_family_only(tmp_path):
    """`erase.family_targets: {sd3: ...}` replaces the group's safe text on that family: in the pairs the erasure solves
    for (through `plan` and `Plan.for_family`, as `run` does with the pipeline's family), in the patch's spec record
    and in the spec a held-out attack rebuilds from it; a bad family is refused by name."""
    from trce.attacks.held_out import _spec_from_record
    from trce.methods import plan

    raw = _minimal()
    raw["erase"]["family_targets"] = {"sd3": "a bird", "flux": ""}
    spec = load_spec(_write(tmp_path, raw))
    assert {p.safe for p in spec.pairs()} == {"a photo of a dog", "a dog in a garden"}
    on_sd3 = spec.for_family("sd3")
    assert {(p.safe, p.target) for p in on_sd3.pairs()} == {("a photo of a bird", "a bird"), ("a bird in a garden",
                                                                                                 "a bird")}
    assert [p.malicious for p in on_sd3.pairs()] == [p.malicious for p in spec.pairs()]
    assert {p.safe for p in spec.for_family("flux").pairs()} == {"a photo of", "in a garden"}
    assert spec.for_family("sd1").pairs() == spec.pairs() and on_sd3.for_family(None).pairs() == spec.pairs()
    assert plan(spec, family="sd3").specs[0].pairs() == on_sd3.pairs()
    assert plan(spec).for_family("sd3").specs[0].pairs() == on_sd3.pairs()
    assert plan(spec).for_family("sd3").for_family("sdxl").specs[0].pairs() == spec.pairs()
    record = on_sd3.to_dict()
    assert record["family"] == "sd3" and record["expressions"][0]["family_targets"] == {"sd3": "a bird", "flux": ""}
    assert "family" not in spec.to_dict()
    assert _spec_from_record(record)[0].pairs() == on_sd3.pairs()
    sw = load_spec("shapeworld-red")  # the DiT's measured target: "a blue circle", not "a circle"
    assert {e.target_for("sd3") for e in sw.expressions} == {"blue"} and {e.target for e in sw.expressions} == {""}
    raw["erase"]["family_targets"] = {"sd33": "a bird"}
    with pytest.raises(TrceError, match=r"erase\.family_targets\.sd33.*did you mean 'sd3'"):
        load_spec(_write(tmp_path, raw))


def test_family_settings_win_on_their_family_only(tmp_path):
    """A spec's `family_settings` apply on that family (over `settings`, under the caller's); `trce.erase` and the
    CLI take the family from the pipeline; a bad family or setting name is refused by name."""
    from trce.methods import plan

    raw = _minimal(settings={"V": {"lr": 1e-4}, "T": {"eta": 0.5}},
                   family_settings={"sdxl": {"V": {"lr": 3e-5}, "T": {"eta": 0.03}}})
    spec = load_spec(_write(tmp_path, raw))
    assert (plan(spec).configs["V"].lr, plan(spec).configs["T"].eta) == (1e-4, 0.5)
    assert (plan(spec, family="sd1").configs["V"].lr, plan(spec, family="sd1").configs["T"].eta) == (1e-4, 0.5)
    xl = plan(spec, family="sdxl")
    assert (xl.configs["V"].lr, xl.configs["T"].eta, xl.record()["family"]) == (3e-5, 0.03, "sdxl")
    assert plan(spec, family="sdxl", V={"lr": 1e-3}).configs["V"].lr == 1e-3  # the caller still wins
    later = plan(spec, V={"epochs": 2}).for_family("sdxl")  # what `run` does with the pipeline's family
    assert (later.configs["V"].lr, later.configs["V"].epochs) == (3e-5, 2)
    # alternative settings: the caller's KPOP prompt_size replaces the family's prompt_tokens (not "give one, not both")
    kp = load_spec(_write(tmp_path, _minimal(family_settings={"sd3": {"kpop": {"prompt_tokens": 32, "lr": 0.5}}})))
    sized = plan(kp, method="kpop", family="sd3", kpop={"prompt_size": 1}).configs["kpop"]
    assert (sized.prompt_size, sized.prompt_tokens, sized.lr) == (1, None, 0.5)
    assert plan(kp, method="kpop", family="sd3").configs["kpop"].prompt_tokens == 32
    with pytest.raises(TrceError, match=r"family_settings\.sdxlx.*did you mean 'sdxl'"):
        load_spec(_write(tmp_path, _minimal(family_settings={"sdxlx": {"V": {"lr": 1.0}}})))
    with pytest.raises(TrceError, match=r"family_settings\.sdxl\.V.*unknown V setting 'lrr'"):
        load_spec(_write(tmp_path, _minimal(family_settings={"sdxl": {"V": {"lrr": 1.0}}})))
