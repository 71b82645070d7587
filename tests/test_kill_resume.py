"""Every long job resumes after `kill -9`: the same command again finishes with the result of an uninterrupted run
(eval, attack, stage V, KPOP, ESD, ShapeWorld training); Ctrl-C leaves no half-written file and says how to resume.

Each job runs as a real `python -m trce.cli` subprocess (one thread, so runs are bit-reproducible), is killed with
SIGKILL as soon as its first checkpoint or result line is on disk (so the kill lands in the middle of the next
step), then rerun; an uninterrupted run of the same command in another folder is the reference.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from trce.utils import io

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "trce.cli", "-q", *map(str, args)]


def _run(args, cache: Path) -> None:
    done = subprocess.run(_cli(*args), check=False, env={**ENV, "TRCE_CACHE": str(cache)}, capture_output=True,
                          text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr


def _kill_when(args, cache: Path, ready: Callable[[], bool], sig: int = signal.SIGKILL,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Start the command, send `sig` as soon as `ready()` holds; the process must not have finished by then."""
    # Ctrl-C as a terminal delivers it: a suite started in the background (`.ci/run &`) has SIGINT *ignored*, which
    # children inherit (and Python then installs no KeyboardInterrupt handler); a handled signal is reset to the
    # default on exec, so the child is started while this process handles SIGINT
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(_cli(*args), env={**ENV, "TRCE_CACHE": str(cache), **(env or {})},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.time() + 240
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"the job finished before it could be interrupted: {proc.stderr.read()}")
            if time.time() > deadline:
                pytest.fail("the job never reached the point to interrupt it")
            time.sleep(0.02)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def _same_patch(a: Path, b: Path) -> None:
    wa, wb = io.load_tensors(a / "weights.safetensors"), io.load_tensors(b / "weights.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize("method,settings,marker", [
    ("trce", ["V.n_trajectories=4", "V.n_uncond=8", "V.ddim_steps=4", "V.epochs=4", "V.checkpoint_every=1"],
     "stage-v/stage-v-runs/*/step-*"),
    ("kpop", ["kpop.iterations=16", "kpop.ddim_steps=3", "kpop.latents=current", "kpop.checkpoint_every=2"],
     "runs/kpop-*/step-*"),
    ("esd", ["esd.iterations=24", "esd.ddim_steps=3", "esd.latents=current", "esd.checkpoint_every=2"],
     "runs/esd-*/step-*"),
])
def test_erase_resumes_after_kill_9(method, settings, marker, tiny_dir, tmp_path):
    args = ["erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--method", method,
            *[a for s in settings for a in ("--set", s)]]
    _run([*args, "--out", tmp_path / "whole"], tmp_path / "cache-whole")
    cache = tmp_path / "cache"
    killed = _kill_when([*args, "--out", tmp_path / "patch"], cache, lambda: any(cache.glob(marker)))
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "patch").exists()
    _run([*args, "--out", tmp_path / "patch"], cache)
    _same_patch(tmp_path / "patch", tmp_path / "whole")
    info = io.read_json(tmp_path / "patch" / "patch.json")["info"]
    resumed = (info.get("V") or info).get("resumed_from_step", info.get("resumed_from"))
    assert resumed, info  # it went on from the checkpoint, not from the start
    assert not list(cache.glob(marker))  # the finished run removed its checkpoints


def test_eval_resumes_after_kill_9_and_ctrl_c_says_how(tiny_dir, tmp_path):
    # 54 rows in bursts of 16 (trce.generate.chunk_size); each run holds (sleeps, TRCE_TEST_HOLD_AFTER_RECORDS) after
    # its first burst, so the signals land mid-run however loaded the machine is
    args = ["eval", "--model", tiny_dir, "--suite", "shapeworld-red", "--limit", 6, "--steps", 2, "--batch-size", 2,
            "--no-progress"]
    hold = {"TRCE_TEST_HOLD_AFTER_RECORDS": "1"}
    _run([*args, "--out", tmp_path / "whole"], tmp_path / "c")
    out = tmp_path / "run"
    killed = _kill_when([*args, "--out", out], tmp_path / "c", lambda: _lines(out / "rows.jsonl") >= 1, env=hold)
    assert killed.returncode == -signal.SIGKILL
    before = _lines(out / "rows.jsonl")  # Ctrl-C once the rerun has drawn more: mid-run, not before it started
    assert 0 < before < 54
    stopped = _kill_when([*args, "--out", out], tmp_path / "c", lambda: _lines(out / "rows.jsonl") > before,
                         sig=signal.SIGINT, env=hold)
    assert stopped.returncode == 130 and "rerun the same command to resume" in stopped.stderr
    assert not list(out.rglob("*.tmp")) and not (out / "metrics.json").exists()  # nothing half-written
    _run([*args, "--out", out], tmp_path / "c")
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "whole"))
    assert (a["n"], a["groups"], a["clip_score"]) == (b["n"], b["groups"], b["clip_score"])
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == len({r["name"] for r in rows}) == a["n"]  # no row doubled


def test_attack_resumes_after_kill_9(tiny_dir, tmp_path):
    args = ["attack", "--model", tiny_dir, "--suite", "shapeworld-red", "--attack", "ring-a-bell", "--limit", 4,
            "--steps", 2, "--no-progress", "--budget", "generations=6", "population=8", "elite=2"]
    _run([*args, "--out", tmp_path / "whole"], tmp_path / "c")
    out = tmp_path / "run"
    killed = _kill_when([*args, "--out", out], tmp_path / "c", lambda: _lines(out / "results.jsonl") >= 1)
    assert killed.returncode == -signal.SIGKILL
    _run([*args, "--out", out], tmp_path / "c")
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "whole"))
    assert a["attack"]["asr_after"] == b["attack"]["asr_after"] and a["n"] == b["n"]
    prompts = [[json.loads(x)["prompt"] for x in (d / "results.jsonl").read_text().splitlines()]
               for d in (out, tmp_path / "whole")]
    assert prompts[0] == prompts[1]


def test_shapeworld_training_resumes_after_kill_9(tmp_path):
    args = ["shapeworld", "train", "--tiny", "--device", "cpu", "--unet-steps", 8]
    _run([*args, "--out", tmp_path / "whole"], tmp_path / "c")
    out = tmp_path / "run"
    killed = _kill_when([*args, "--out", out], tmp_path / "c", lambda: (out / "unet" / "last.json").exists())
    assert killed.returncode == -signal.SIGKILL and not (out / "export" / "DONE").exists()
    _run([*args, "--out", out], tmp_path / "c")
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = io.load_tensors(out / "export" / part), io.load_tensors(tmp_path / "whole" / "export" / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part
