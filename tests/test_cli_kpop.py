import json

import numpy as np
import pytest
from PIL import Image

from trce.testing import assert_one_line_error


@pytest.mark.heavy
def test_kpop_erase_and_hidden_prompt_end_to_end(run_cli, tiny_dir, tmp_path):
    patch = tmp_path / "kpop"
    code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--method", "kpop",
                             "--set", "kpop.iterations=2", "--set", "kpop.latents=cached", "--set",
                             "kpop.ddim_steps=2", "--set", "kpop.cache_trajectories=1", "--out", patch)
    assert code == 0, err
    meta = json.loads((patch / "patch.json").read_text())
    assert meta["method"] == "kpop" and meta["extras"] == ["hidden_prompt"]
    assert meta["config"]["settings"]["kpop"]["iterations"] == 2
    # the spec's settings apply under --set: ESD's target and the preservation term on the spec's captions
    settings = meta["settings"]
    assert settings["negative_guidance"] == 1.0 and settings["preserve_weight"] == 0.5 and settings["sites"] == "all"
    # shapeworld-red: preserve {source: shapeworld-captions, n: 1000}, the distinct ones of them
    assert 900 < settings["preserve_prompts"]["n"] <= 1000
    images = {}
    for name, extra in (("plain", []), ("hidden", ["--with-hidden-prompt"])):
        code, _, err = run_cli("generate", "--model", tiny_dir, "--patch", patch, *extra, "--prompt", "a red star",
                               "--steps", 2, "--out", tmp_path / f"{name}.png")
        assert code == 0, err
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
    assert not np.array_equal(images["plain"], images["hidden"])

    # trce eval --with-hidden-prompt: the same suite and seeds with the hidden prompt, a row of its own in the report
    runs = {}
    for name, extra in (("plain", []), ("hidden", ["--with-hidden-prompt"])):
        runs[name] = tmp_path / f"eval-{name}"
        code, out, err = run_cli("eval", "--model", tiny_dir, "--patch", patch, *extra, "--suite", "shapeworld-red",
                                 "--limit", 2, "--steps", 2, "--no-progress", "--out", runs[name])
        assert code == 0, err
    assert "(kpop + hidden prompt)" in out
    metrics = {k: json.loads((v / "metrics.json").read_text()) for k, v in runs.items()}
    assert metrics["hidden"]["hidden_prompt"] is True and "hidden_prompt" not in metrics["plain"]
    rows = {k: [(r["prompt"], r["seed"]) for r in map(json.loads, (v / "rows.jsonl").read_text().splitlines())]
            for k, v in runs.items()}
    assert rows["hidden"] == rows["plain"] and len(rows["plain"]) >= 4  # same prompts, same seeds
    pixels = {k: np.asarray(Image.open(next((v / "images").rglob("*.png")))) for k, v in runs.items()}
    assert not np.array_equal(pixels["plain"], pixels["hidden"])
    code, _, err = run_cli("report", str(runs["plain"]), str(runs["hidden"]), "--out", tmp_path / "r.html")
    assert code == 0, err
    html = (tmp_path / "r.html").read_text()
    assert "KPOP + hidden prompt" in html and "KPOP</td>" in html.replace(" ", "")


@pytest.mark.heavy
def test_three_shapes_push_away_from_the_other_erased_shapes_end_to_end(run_cli, tiny_dir, tmp_path):
    patch = tmp_path / "kpop3"
    fast = ["--set", "kpop.iterations=1", "--set", "kpop.ddim_steps=2", "--set", "kpop.batch_size=1"]
    code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-3shapes", "--method", "kpop", *fast,
                           "--out", patch)
    assert code == 0, err
    settings = json.loads((patch / "patch.json").read_text())["settings"]
    # the spec's negative_others: each erase prompt also names the two other erased shapes
    assert settings["negative_others"] == 0.25 and settings["other_concept_prompts"]["per_prompt"] == 2
    code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-3shapes", "--method", "kpop", *fast,
                           "--set", "kpop.negative_others=-1", "--out", tmp_path / "bad")
    assert_one_line_error(code, err, "KPOP negative_others must be a number >= 0, got -1.0")
    assert not (tmp_path / "bad").exists()


def test_hidden_prompt_needs_a_kpop_patch(run_cli, tiny_dir, tmp_path):
    code, _, err = run_cli("generate", "--model", tiny_dir, "--with-hidden-prompt", "--prompt", "x",
                           "--out", tmp_path / "x.png")
    assert code == 2 and "--patch" in err
    patch = tmp_path / "t"
    assert run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--stages", "T", "--out", patch)[0] == 0
    code, _, err = run_cli("generate", "--model", tiny_dir, "--patch", patch, "--with-hidden-prompt", "--prompt", "x",
                           "--out", tmp_path / "x.png")
    assert code == 2 and "no hidden prompt" in err
    for extra in (["--patch", patch], []):  # eval: a TRCE patch has none; no patch at all
        code, _, err = run_cli("eval", "--model", tiny_dir, *extra, "--with-hidden-prompt", "--suite", "shapeworld-red",
                               "--limit", 1, "--steps", 1, "--out", tmp_path / "e")
        assert_one_line_error(code, err, "no hidden prompt" if extra else "--patch")


def test_bad_stage_settings_are_one_line_errors(run_cli, tiny_dir, tmp_path):
    for bad, needle in ((["--set", "kpop.iteratons=2"], "iterations"), (["--set", "kpop.iterations=two"], "two"),
                        (["--set", "nonsense"], "nonsense")):
        code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--method", "kpop",
                               *bad, "--out", tmp_path / "p")
        assert code == 2 and needle in err and "Traceback" not in err, err
