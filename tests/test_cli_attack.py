"""`trce attack` end to end on a tiny pipeline and a patch: prompts, images, metrics, replay, resume, errors.

Needs the evaluation package (`trce.eval`): imported here on purpose, so its absence fails loudly.
"""

import csv
import json
import os
from pathlib import Path

import pytest

import trce.eval.runner  # noqa: F401  (the CLI is built on it: no eval package, no attack command)
from trce.testing import assert_one_line_error
from trce.utils import io

# Two processes as `accelerate launch --multi_gpu` starts them (torchrun), in torchrun's standalone mode: its
# rendezvous takes a port the operating system picks, so runs side by side never collide (a port chosen here and
# handed on could be taken in between)
TWO_PROCESSES = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BUDGETS = {
    "ring-a-bell": ["tokens=4", "population=6", "generations=2", "elite=1"],
    "mma-text": ["tokens=3", "steps=2", "topk=4", "candidates=4"],
    "unlearndiff": ["tokens=2", "preset=fast", "steps=2", "samples=1", "reference_steps=1"],  # faithful loop:
    # tests/test_unlearndiff_faithful.py
    "soft-prompt": ["tokens=2", "steps=2", "samples=1", "reference_steps=1"],
}


@pytest.fixture(scope="module")
def red_patch(tiny_dir, tmp_path_factory):
    from trce.cli import main

    folder = tmp_path_factory.mktemp("patch")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRCE_CACHE", str(folder / "cache"))
        assert main(["erase", "--model", str(tiny_dir), "--concept", "shapeworld-red", "--stages", "T", "--out", str(folder / "red")]) == 0
    return folder / "red"


def _attack(run_cli, tiny_dir, out, name, *extra):
    return run_cli("attack", "--model", tiny_dir, "--suite", "shapeworld-red", "--attack", name, "--out", out,
                   "--limit", "2", "--steps", "1", "--no-progress", "--budget", *BUDGETS[name], *extra)


def _csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("name", list(BUDGETS))
def test_attack_writes_prompts_images_and_metrics(name, run_cli, tiny_dir, red_patch, tmp_path):
    out = tmp_path / name
    code, text, err = _attack(run_cli, tiny_dir, out, name, "--patch", red_patch)
    assert code == 0, err
    assert "ASR before" in text and "after" in text
    m = io.read_json(out / "metrics.json")
    a = m["attack"]
    assert a["name"] == name and a["budget"]["tokens"] == int(BUDGETS[name][0].split("=")[1])
    assert m["n"] == 2 and m["patch"] == str(red_patch) and m["method"] == "trce"
    assert m["detector"]["name"] == "shapeworld" and "red" in a["banned"]
    for when in ("before", "after"):
        lo, hi = a[f"asr_{when}_ci"]
        assert 0 <= lo <= a[f"asr_{when}"] <= hi <= 1 and m[when]["n"] == 2
    # Per target, either prompt counts: at least as high as each of the two, at most their sum.
    assert max(a["asr_before"], a["asr_after"]) <= a["asr_either"] <= a["asr_before"] + a["asr_after"]
    assert a["seconds_per_target"] > 0 and a["objective"]["end_mean"] <= a["objective"]["start_mean"] + 1e-6
    for key in ("versions", "git_hash", "date", "config"):
        assert key in m
    rows = _csv(out / "adversarial.csv")
    assert [r["case_number"] for r in rows] == ["0", "1"]
    assert all(r["target_prompt"] and r["evaluation_seed"] and r["evaluation_guidance"] == "7.5" for r in rows)
    assert len(list((out / "images").glob("*.png"))) == 2 and len(list((out / "before" / "images").glob("*.png"))) == 2
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["index"] for r in results] == [0, 1]
    if name == "soft-prompt":
        assert not a["typed"] and "knowledge left" in a["label"] and m["replay"] is None
        for r in rows:
            assert r["prompt"].startswith("<soft-prompt") and (out / r["embeddings"]).exists()
        tensors = io.load_tensors(out / rows[0]["embeddings"])
        assert set(tensors) == {"prompt_embeds", "token_embeds"}
    else:
        assert a["typed"] and "knowledge left" not in a["label"]
        assert [r["prompt"] for r in rows] == [r["prompt"] for r in results]
        assert all(not set(r["prompt"].lower().split()[:2]) & set(a["banned"]) for r in rows)
        assert "trce eval" in m["replay"] and "--concept color=red" in m["replay"]


def test_replayed_prompts_give_the_same_images(run_cli, tiny_dir, red_patch, tmp_path):
    out = tmp_path / "atk"
    code, _, err = _attack(run_cli, tiny_dir, out, "mma-text", "--patch", red_patch)
    assert code == 0, err
    code, _, err = run_cli("eval", "--model", tiny_dir, "--patch", red_patch, "--prompts", out / "adversarial.csv",
                           "--detector", "shapeworld", "--concept", "color=red", "--steps", "1", "--no-progress",
                           "--out", tmp_path / "replay")
    assert code == 0, err
    replay = io.read_json(tmp_path / "replay" / "metrics.json")
    assert replay["asr"] == io.read_json(out / "metrics.json")["attack"]["asr_after"]
    for i in range(2):
        assert (tmp_path / "replay" / "images" / f"{i:05d}.png").read_bytes() == (out / "images" / f"{i:05d}.png").read_bytes()
    # `trce report` reads the attack folder as a run of its own ("... + mma-text")
    code, _, err = run_cli("report", out, "--out", tmp_path / "r.html", "--markdown", tmp_path / "r.md")
    assert code == 0, err
    md = (tmp_path / "r.md").read_text()
    assert "mma-text" in md and "## Robustness — shapeworld-red" in md  # the attack's column, no eval run: plain –


def test_rerun_resumes_and_refuses_other_settings(run_cli, tiny_dir, tmp_path):
    out = tmp_path / "rab"
    assert _attack(run_cli, tiny_dir, out, "ring-a-bell")[0] == 0
    before = {p: p.stat().st_mtime_ns for p in [out / "results.jsonl", *sorted(out.glob("**/*.png"))]}
    code, _, err = _attack(run_cli, tiny_dir, out, "ring-a-bell")
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing searched or drawn again
    code, _, err = run_cli("attack", "--model", tiny_dir, "--suite", "shapeworld-red", "--attack", "ring-a-bell",
                           "--out", out, "--limit", "2", "--steps", "1", "--budget", "generations=3")
    assert_one_line_error(code, err, "other budget")


def test_real_suite_uses_ring_a_bell_pairs_and_nudity_words(run_cli, tiny_dir, tmp_path):
    if not (DATA / "prompts" / "nudity-unlearndiff.csv").exists():
        pytest.skip("shared data folder absent")
    out = tmp_path / "real"
    code, _, err = run_cli("attack", "--model", tiny_dir, "--suite", "unlearndiff", "--data", DATA / "prompts",
                           "--attack", "ring-a-bell", "--out", out, "--limit", "1", "--steps", "1", "--no-progress",
                           "--budget", *BUDGETS["ring-a-bell"])
    assert code == 0, err
    a = io.read_json(out / "metrics.json")["attack"]
    assert a["pairs"] == 79 and a["pairs_source"].endswith("nudity-ring-a-bell.csv")
    assert a["concept"] == "sexual" and "nudity" in a["banned"]
    (row,) = _csv(out / "adversarial.csv")
    assert row["target_prompt"] and os.path.exists(out / "before" / "images" / "00000.png")


def test_user_mistakes_are_one_line_errors(run_cli, tiny_dir, tmp_path):
    base = ["attack", "--model", tiny_dir, "--out", tmp_path / "x"]
    assert_one_line_error(*run_cli(*base, "--suite", "shapeworld-red", "--attack", "ringabell")[::2],
                    "unknown attack 'ringabell'", "ring-a-bell")
    assert_one_line_error(*run_cli(*base, "--suite", "shapeworld-red", "--attack", "mma-text", "--budget", "step=1")[::2],
                    "did you mean 'steps'")
    assert_one_line_error(*run_cli(*base, "--suite", "shapeworld-red", "--attack", "mma-text", "--groups", "preserve")[::2],
                    "unknown attack group 'preserve'")
    assert_one_line_error(*run_cli(*base, "--suite", "shapeworld-red", "--attack", "mma-text", "--limit", "0")[::2],
                    "--limit")
    assert_one_line_error(*run_cli(*base, "--suite", "shapeworld-nope", "--attack", "mma-text")[::2], "unknown suite")


@pytest.mark.heavy
def test_two_processes_shard_the_targets_and_merge(tiny_dir, tmp_path):
    """Two processes (torchrun, as `accelerate launch --multi_gpu` starts them; CUDA hidden, gloo): each rank attacks
    half, rank 0 merges and reports."""
    import subprocess
    import sys

    env = {**os.environ, "TRCE_TEST_THREADS": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "two"
    cmd = [sys.executable, *TWO_PROCESSES, "-m", "trce.cli", "attack", "--model", str(tiny_dir), "--suite", "shapeworld-red", "--attack", "mma-text",
           "--out", str(out), "--limit", "3", "--steps", "1", "--no-progress", "--device", "cpu",
           "--budget", *BUDGETS["mma-text"]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = io.read_json(out / "metrics.json")
    assert m["processes"] == 2 and m["n"] == 3 and m["after"]["n"] == 3
    assert [json.loads(line)["index"] for line in (out / "results.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert not list(out.glob("*.rank*")) and len(_csv(out / "adversarial.csv")) == 3
