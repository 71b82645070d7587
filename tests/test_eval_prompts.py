"""Prompt loaders on the real benchmark files, suites as data, ShapeWorld prompt groups."""

from pathlib import Path

import pytest

from trce.errors import TrceError
from trce.eval.prompts import load_prompts
from trce.eval.suites import SHAPEWORLD_GROUPS, list_suites, load_suite, shapeworld_rows

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"


@pytest.fixture(scope="module")
def data():
    if not DATA.is_dir():
        pytest.skip(f"shared prompt data not found at {DATA}")
    return DATA


@pytest.mark.parametrize(("name", "rows", "layout"), [
    ("i2p.csv", 4703, "i2p"),
    ("I2P_prompts_sexual.csv", 931, "i2p"),
    ("nudity-mma-diffusion.csv", 1000, "mma"),
    ("nudity-p4d.csv", 151, "p4d"),
    ("nudity-ring-a-bell.csv", 79, "ring-a-bell"),
    ("nudity-unlearndiff.csv", 142, "i2p"),
    ("coco_30k_val.csv", 3000, "case-number"),
    ("big_artist_prompts.csv", 100, "case-number"),
])
def test_real_files_row_counts(data, name, rows, layout):
    from trce.eval.prompts import _read_csv, detect_layout

    loaded = load_prompts(data / name)
    assert len(loaded) == rows
    assert detect_layout(_read_csv(data / name)[0]) == layout
    assert all(isinstance(r.prompt, str) for r in loaded)
    assert sum(bool(r.prompt) for r in loaded) >= rows - 1  # i2p.csv has one empty prompt


def test_i2p_fields(data):
    rows = load_prompts(data / "i2p.csv")
    cats = {c for r in rows for c in r.categories}
    assert cats == {"hate", "harassment", "violence", "self-harm", "sexual", "shocking", "illegal activity"}
    assert all(isinstance(r.seed, int) and r.guidance is not None for r in rows)
    assert sum("sexual" in r.categories for r in rows) == 931
    first = rows[0]
    assert first.case_number == 0 and first.seed == 4261553411 and first.guidance == 13.0
    assert "lexica_url" in first.extra and "" not in first.extra  # the unnamed index column is dropped


def test_adversarial_layouts(data):
    mma = load_prompts(data / "nudity-mma-diffusion.csv")
    assert mma[0].seed is None and mma[0].extra["target_prompt"].startswith("An older woman")
    assert not mma[0].prompt.startswith("An older woman")  # the adversarial prompt, not the target
    ring = load_prompts(data / "nudity-ring-a-bell.csv", default_category="nudity")
    assert ring[0].categories == ("nudity",) and "normal prompt" in ring[0].extra
    p4d = load_prompts(data / "nudity-p4d.csv")
    assert p4d[0].seed == 206205177 and p4d[0].guidance == 7.0 and p4d[0].case_number == 1172
    artists = load_prompts(data / "big_artist_prompts.csv", columns={"categories": "artist"})
    assert artists[0].categories == ("Pablo Picasso",) and artists[0].seed == 3721


def test_plain_files_and_multiline_fields(tmp_path):
    csv_file = tmp_path / "mine.csv"
    csv_file.write_text('id,prompt\n1,"a red star,\non two lines"\n2,plain\n', encoding="utf-8")
    rows = load_prompts(csv_file)
    assert [r.prompt for r in rows] == ["a red star,\non two lines", "plain"]
    assert rows[0].seed is None and rows[0].extra == {"id": "1"}
    txt = tmp_path / "mine.txt"
    txt.write_text("a red star\n\n  a blue circle  \n", encoding="utf-8")
    assert [r.prompt for r in load_prompts(txt)] == ["a red star", "a blue circle"]


@pytest.mark.parametrize(("content", "message"), [
    (b"", "empty"),
    (b"text,other\nx,y\n", "no column 'prompt'"),
    (b"prompt\n", "no rows"),
    (b"prompt,evaluation_seed,case_number\nhi,abc,1\n", "should be a number"),
    (b"prompt\n\xff\xfe bad\n", "not UTF-8"),
    (b"prompt,x\na,b,c\n", "more fields"),
])
def test_malformed_files_name_file_and_problem(tmp_path, content, message):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(content)
    with pytest.raises(TrceError, match=message) as err:
        load_prompts(bad)
    assert "bad.csv" in str(err.value)


def test_layout_by_name_and_unknown_layout(tmp_path, data):
    with pytest.raises(TrceError, match="no column 'adv_prompt'"):
        load_prompts(data / "nudity-p4d.csv", layout="mma")
    with pytest.raises(TrceError, match="unknown prompt layout 'mmma'.*did you mean 'mma'"):
        load_prompts(data / "nudity-p4d.csv", layout="mmma")


def test_builtin_suites_are_valid_data():
    names = {s.name for s in list_suites()}
    assert {"i2p-sexual", "i2p", "mma", "p4d", "ring-a-bell", "unlearndiff", "coco-3k", "artists"} <= names
    assert {"shapeworld-red", "shapeworld-star", "shapeworld-striped", "shapeworld-3shapes"} <= names
    ring = load_suite("ring-a-bell")
    assert "not the real Ring-A-Bell" in ring.description and "not the real Ring-A-Bell" in ring.note
    with pytest.raises(TrceError, match="unknown suite 'i2p-sexul'.*did you mean 'i2p-sexual'"):
        load_suite("i2p-sexul")


@pytest.mark.parametrize(("suite", "rows"), [("i2p-sexual", 931), ("mma", 1000), ("p4d", 151), ("ring-a-bell", 79),
                                             ("unlearndiff", 142), ("coco-3k", 3000), ("artists", 100), ("i2p", 4703)])
def test_suites_read_data_folder_or_file(data, suite, rows):
    s = load_suite(suite)
    assert len(s.rows(data)) == rows
    assert len(s.rows(data / s.file, limit=5)) == 5


def test_missing_data_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("TRCE_DATA", raising=False)
    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(TrceError, match="needs the prompt file nudity-p4d.csv.*--data PATH"):
        load_suite("p4d").rows()
    with pytest.raises(TrceError, match="not in --data folder"):
        load_suite("p4d").rows(tmp_path)
    (tmp_path / "nudity-p4d.csv").write_text("prompt,evaluation_seed,evaluation_guidance\nx,1,7\n")
    monkeypatch.setenv("TRCE_DATA", str(tmp_path))
    assert load_suite("p4d").rows()[0].seed == 1


def test_suite_yaml_file_and_its_errors(tmp_path):
    good = tmp_path / "blue.yaml"
    good.write_text("name: my-blue\nkind: shapeworld\ndetector: shapeworld\nattribute: color\nvalues: [blue]\nn: 3\n")
    s = load_suite(str(good))
    assert s.groups == SHAPEWORLD_GROUPS and len(s.rows()) == 15
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nkind: shapeworld\ndetector: shapeworld\nattribute: color\nvalues: [bleu]\n")
    with pytest.raises(TrceError, match="unknown color value 'bleu'.*did you mean 'blue'"):
        load_suite(str(bad))
    bad.write_text("name: x\nkind: real\ndetector: nudenet\nsource: {file: a.csv}\ncolums: {}\n")
    with pytest.raises(TrceError, match="unknown field.*colums"):
        load_suite(str(bad))


def test_shapeworld_groups_name_what_they_should():
    from trce.shapeworld import world

    v = world.vocab()
    suite = load_suite("shapeworld-red")
    rows = shapeworld_rows(suite, limit=12)
    by_group = {g: [r for r in rows if r.extra["group"] == g] for g in suite.groups}
    assert all(len(rs) == 12 for rs in by_group.values())
    spec = {"red", *v.expressions("color", "red", "synonym", "spec"), *v.expressions("color", "red", "paraphrase", "spec")}
    held_syn = v.expressions("color", "red", "synonym", "heldout")
    held_par = v.expressions("color", "red", "paraphrase", "heldout")
    assert all(any(e in r.prompt.split() or e in r.prompt for e in spec) for r in by_group["keyword"])
    assert {r.extra["form"] for r in by_group["keyword"]} == set(world.FORMS)
    assert all(any(e in r.prompt.split() for e in held_syn) for r in by_group["synonym"])
    assert all(any(e in r.prompt for e in held_par) for r in by_group["paraphrase"])
    for g in ("keyword", "synonym", "paraphrase"):
        assert all(r.extra["named"]["color"] == "red" for r in by_group[g])
    assert {r.extra["named"]["color"] for r in by_group["preserve"]} == set(v.values("color")) - {"red"}
    assert all("color" not in r.extra["named"] for r in by_group["unrelated"])
    assert all(set(r.extra["named"]) == set(world.ATTRIBUTES) - {"color"} for r in by_group["unrelated"])
    # fixed seeds, distinct across groups; --limit keeps a prefix
    seeds = [r.seed for r in rows]
    assert len(set(seeds)) == len(seeds)
    assert [r.prompt for r in shapeworld_rows(suite, limit=3)] == [r.prompt for r in rows if r.case_number < 3]


def test_shapeworld_multi_value_suite():
    suite = load_suite("shapeworld-3shapes")
    rows = shapeworld_rows(suite, limit=6)
    assert {r.extra["value"] for r in rows if r.extra["group"] == "keyword"} == {"circle", "star", "triangle"}
    assert {r.extra["value"] for r in rows if r.extra["group"] == "preserve"} == {"square", "cross", "diamond"}
