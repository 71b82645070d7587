import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from trce.cli import build_parser


def _all_subparsers(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,), sub
                yield from _all_subparsers(sub, prefix + (name,))


def test_every_subcommand_help_shows_examples():
    assert "examples:" in build_parser().format_help()
    commands = list(_all_subparsers(build_parser()))
    assert {c[0] for c, _ in commands} >= {"info", "generate", "shapeworld", "demo"}
    for path, sub in commands:
        assert "examples:" in sub.format_help(), path


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "trce.cli", "--help"], capture_output=True, text=True, check=True)
    assert "trce demo" in out.stdout


def test_info_json(run_cli, tiny_dir):
    code, out, _ = run_cli("info", "--model", tiny_dir, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["parameters"]["unet"] > 0 and info["image_size"] == 32 and info["cross_attention_layers"] > 0


@pytest.mark.parametrize("command", [["info"], ["generate", "--prompt", "x", "--out", "x.png"],
                                     ["shapeworld", "check", "--n", "3"]])
def test_bad_model_name_is_one_line_error(run_cli, command):
    code, _out, err = run_cli(*command, "--model", "no-such-model")
    assert code == 2
    assert "Traceback" not in err
    assert err.strip().count("\n") == 0 and "no-such-model" in err


def test_generate_is_reproducible(run_cli, tiny_dir, tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]
    for path, seed in zip(paths, (0, 0, 1)):
        code, _, err = run_cli("generate", "--model", tiny_dir, "--prompt", "a crimson star on a black background",
                               "--seed", seed, "--steps", 2, "--out", path)
        assert code == 0, err
    a, b, c = (np.asarray(Image.open(p)) for p in paths)
    assert a.shape == (32, 32, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    record = json.loads(paths[0].with_suffix(".json").read_text())
    assert record["seeds"] == [0] and record["versions"]["torch"] and "git_hash" in record


def test_generate_grid_and_bad_output(run_cli, tiny_dir, tmp_path):
    code, _, _ = run_cli("generate", "--model", tiny_dir, "--prompt", "a red circle", "--n", 3, "--steps", 1,
                         "--out", tmp_path / "g.png")
    assert code == 0 and Image.open(tmp_path / "g.png").size[0] > 32 * 3
    code, _, err = run_cli("generate", "--model", tiny_dir, "--prompt", "x", "--out", tmp_path / "g.jpg")
    assert code == 2 and "g.jpg" in err


@pytest.mark.heavy
def test_shapeworld_train_tiny_resumes_and_refuses_other_settings(run_cli, tmp_path):
    out = tmp_path / "sw"
    code, _, err = run_cli("shapeworld", "train", "--out", out, "--tiny")
    assert code == 0, err
    assert (out / "export" / "model_index.json").exists() and (out / "export" / "made.json").exists()
    before = (out / "unet" / "ema.safetensors").stat().st_mtime_ns
    code, _, err = run_cli("shapeworld", "train", "--out", out, "--tiny")
    assert code == 0 and (out / "unet" / "ema.safetensors").stat().st_mtime_ns == before
    code, _, err = run_cli("shapeworld", "train", "--out", out, "--tiny", "--seed", "3")
    assert code == 2 and "seed" in err
    code, _out_json, err = run_cli("info", "--model", out / "export", "--json")
    assert code == 0, err


def test_shapeworld_check_json(run_cli, tiny_dir):
    code, out, err = run_cli("shapeworld", "check", "--model", tiny_dir, "--n", 3, "--steps", 1, "--json")
    assert code in (0, 1), err
    result = json.loads(out)
    for group in ("keyword", "synonym", "paraphrase"):
        row = result["groups"][group]
        assert row["n"] == 1 and set(row) >= {"color", "shape", "pattern", "background"}
        assert all(0.0 <= row[a] <= 1.0 for a in ("color", "shape", "pattern", "background"))
    assert -1.0 <= result["eot_keyword_cosine"]["mean"] <= 1.0
    assert result["passed"] == (code == 0)


@pytest.mark.heavy
def test_shapeworld_train_can_be_extended(run_cli, tmp_path):
    out = tmp_path / "sw"
    assert run_cli("shapeworld", "train", "--out", out, "--tiny")[0] == 0
    code, _, err = run_cli("shapeworld", "train", "--out", out, "--tiny", "--unet-steps", 6)
    assert code == 0, err
    assert json.loads((out / "unet" / "last.json").read_text())["step"] == 6
    assert json.loads((out / "train.json").read_text())["extended"] == [{"from": 4, "to": 6}]


@pytest.mark.heavy
def test_shapeworld_train_warm_start_reuses_stages_and_starts_from_its_weights(run_cli, tmp_path, caplog):
    import logging

    from safetensors.torch import load_file

    first, second = tmp_path / "a", tmp_path / "b"
    assert run_cli("shapeworld", "train", "--out", first, "--tiny", "--clip-aux-weight", "0")[0] == 0
    caplog.set_level(logging.INFO, logger="trce.shapeworld.train")
    code, _, err = run_cli("shapeworld", "train", "--out", second, "--tiny", "--warm-start", first, "--clip-steps", 2)
    assert code == 0, err
    # Pool, VAE and detector have the same settings: copied, bit for bit.
    for stage, name in (("pool", "pool.npz"), ("vae", "diffusion_pytorch_model.safetensors"),
                        ("detector", "detector.safetensors")):
        assert (first / stage / name).read_bytes() == (second / stage / name).read_bytes()
    record = json.loads((second / "export" / "made.json").read_text())
    assert record["config"]["warm_start"] == str(first) and record["config"]["clip_aux_weight"] == 1.0
    # CLIP and UNet start from the first run's weights and then train further.
    assert "CLIP warm start" in caplog.text and "UNet warm start" in caplog.text
    a, b = load_file(first / "unet" / "ema.safetensors"), load_file(second / "unet" / "ema.safetensors")
    assert any(not (a[k] == b[k]).all() for k in a)
    code, _, err = run_cli("shapeworld", "train", "--out", tmp_path / "c", "--tiny", "--warm-start", tmp_path / "none")
    assert code == 2 and "none" in err and "not a finished" in err
