import json

import numpy as np
from PIL import Image


def test_kpop_erase_and_hidden_prompt_end_to_end(run_cli, tiny_dir, tmp_path):
    patch = tmp_path / "kpop"
    code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--method", "kpop",
                             "--set", "kpop.iterations=2", "--set", "kpop.latents=cached", "--set",
                             "kpop.ddim_steps=2", "--set", "kpop.cache_trajectories=1", "--out", patch)
    assert code == 0, err
    meta = json.loads((patch / "patch.json").read_text())
    assert meta["method"] == "kpop" and meta["extras"] == ["hidden_prompt"]
    assert meta["config"]["stage_settings"]["kpop"]["iterations"] == 2
    images = {}
    for name, extra in (("plain", []), ("hidden", ["--with-hidden-prompt"])):
        code, _, err = run_cli("generate", "--model", tiny_dir, "--patch", patch, *extra, "--prompt", "a red star",
                               "--steps", 2, "--out", tmp_path / f"{name}.png")
        assert code == 0, err
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
    assert not np.array_equal(images["plain"], images["hidden"])


def test_hidden_prompt_needs_a_kpop_patch(run_cli, tiny_dir, tmp_path):
    code, _, err = run_cli("generate", "--model", tiny_dir, "--with-hidden-prompt", "--prompt", "x",
                           "--out", tmp_path / "x.png")
    assert code == 2 and "--patch" in err
    patch = tmp_path / "t"
    assert run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--stages", "T", "--out", patch)[0] == 0
    code, _, err = run_cli("generate", "--model", tiny_dir, "--patch", patch, "--with-hidden-prompt", "--prompt", "x",
                           "--out", tmp_path / "x.png")
    assert code == 2 and "no hidden prompt" in err


def test_bad_stage_settings_are_one_line_errors(run_cli, tiny_dir, tmp_path):
    for bad, needle in ((["--set", "kpop.iteratons=2"], "iterations"), (["--set", "kpop.iterations=two"], "two"),
                        (["--set", "nonsense"], "nonsense")):
        code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--method", "kpop",
                               *bad, "--out", tmp_path / "p")
        assert code == 2 and needle in err and "Traceback" not in err, err
