"""Every long job resumes after `kill -9`: the same command again finishes with the result of an uninterrupted run
(eval, attack, stage V, KPOP, ESD, ShapeWorld training); Ctrl-C leaves no half-written file and says how to resume.

Each job runs as a real CLI subprocess (one thread, so runs are bit-reproducible) that kills itself with SIGKILL
right after its first checkpoint or result line is on disk (`tests/interrupt.py`: a hook, not a race against a
clock), then rerun; an uninterrupted run of the same command in another folder is the reference.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trce.utils import io

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "trce.cli", "-q", *map(str, args)]


def _run(args, cache: Path) -> None:
    """The command run to its end in this process, with the subprocesses' one thread (runs are bit-reproducible):
    the uninterrupted reference and the resume. Only the interrupted run needs a process of its own."""
    from trce.cli import main

    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name, value in {**ENV, "TRCE_CACHE": str(cache)}.items():
                if os.environ.get(name) != value:
                    mp.setenv(name, value)
            assert main(["-q", *map(str, args)]) == 0
    finally:
        torch.set_num_threads(threads)


INTERRUPT = Path(__file__).with_name("interrupt.py")


def _interrupted(args, cache: Path, event: str, sig: str = "KILL", n: int = 1) -> subprocess.CompletedProcess:
    """The command, signalled by itself right after the n-th `event` (tests/interrupt.py: a batch of records appended,
    a file or checkpoint folder put in place): the same point of the run on any machine, no polling."""
    return subprocess.run([sys.executable, str(INTERRUPT), sig, event, str(n), "-q", *map(str, args)], check=False,
                          env={**ENV, "TRCE_CACHE": str(cache)}, capture_output=True, text=True, timeout=300)


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
@pytest.mark.heavy
def test_erase_resumes_after_kill_9(method, settings, marker, tiny_dir, tmp_path):
    args = ["erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--method", method,
            *[a for s in settings for a in ("--set", s)]]
    _run([*args, "--out", tmp_path / "whole"], tmp_path / "cache-whole")
    cache = tmp_path / "cache"
    killed = _interrupted([*args, "--out", tmp_path / "patch"], cache, f"file:{cache}/*{marker}")
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "patch").exists()
    _run([*args, "--out", tmp_path / "patch"], cache)
    _same_patch(tmp_path / "patch", tmp_path / "whole")
    info = io.read_json(tmp_path / "patch" / "patch.json")["info"]
    resumed = (info.get("V") or info).get("resumed_from_step", info.get("resumed_from"))
    assert resumed, info  # it went on from the checkpoint, not from the start
    assert not list(cache.glob(marker))  # the finished run removed its checkpoints


@pytest.mark.heavy
def test_eval_resumes_after_kill_9_and_ctrl_c_says_how(tiny_dir, tmp_path):
    # 54 rows in bursts of 16 (trce.generate.chunk_size): killed after its first burst is recorded, then Ctrl-C
    # after the rerun's first burst, so both signals land mid-run
    args = ["eval", "--model", tiny_dir, "--suite", "shapeworld-red", "--limit", 6, "--steps", 2, "--batch-size", 2,
            "--no-progress"]
    _run([*args, "--out", tmp_path / "whole"], tmp_path / "c")
    out = tmp_path / "run"
    killed = _interrupted([*args, "--out", out], tmp_path / "c", "records:rows")
    assert killed.returncode == -signal.SIGKILL
    before = _lines(out / "rows.jsonl")
    assert 0 < before < 54
    stopped = _interrupted([*args, "--out", out], tmp_path / "c", "records:rows", sig="INT")
    assert _lines(out / "rows.jsonl") > before  # the rerun drew more before Ctrl-C: mid-run, not before it started
    assert stopped.returncode == 130 and "rerun the same command to resume" in stopped.stderr
    assert not list(out.rglob("*.tmp")) and not (out / "metrics.json").exists()  # nothing half-written
    _run([*args, "--out", out], tmp_path / "c")
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "whole"))
    assert (a["n"], a["groups"], a["clip_score"]) == (b["n"], b["groups"], b["clip_score"])
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert len(rows) == len({r["name"] for r in rows}) == a["n"]  # no row doubled


@pytest.mark.heavy
def test_attack_resumes_after_kill_9(tiny_dir, tmp_path):
    args = ["attack", "--model", tiny_dir, "--suite", "shapeworld-red", "--attack", "ring-a-bell", "--limit", 4,
            "--steps", 2, "--no-progress", "--budget", "generations=6", "population=8", "elite=2"]
    _run([*args, "--out", tmp_path / "whole"], tmp_path / "c")
    out = tmp_path / "run"
    killed = _interrupted([*args, "--out", out], tmp_path / "c", "records:results")
    assert killed.returncode == -signal.SIGKILL
    _run([*args, "--out", out], tmp_path / "c")
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (out, tmp_path / "whole"))
    assert a["attack"]["asr_after"] == b["attack"]["asr_after"] and a["n"] == b["n"]
    prompts = [[json.loads(x)["prompt"] for x in (d / "results.jsonl").read_text().splitlines()]
               for d in (out, tmp_path / "whole")]
    assert prompts[0] == prompts[1]


@pytest.mark.heavy
def test_shapeworld_training_resumes_after_kill_9(tmp_path):
    args = ["shapeworld", "train", "--tiny", "--device", "cpu", "--unet-steps", 8]
    _run([*args, "--out", tmp_path / "whole"], tmp_path / "c")
    out = tmp_path / "run"
    killed = _interrupted([*args, "--out", out], tmp_path / "c", f"file:{out}/unet/last.json")
    assert killed.returncode == -signal.SIGKILL and not (out / "export" / "DONE").exists()
    _run([*args, "--out", out], tmp_path / "c")
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = io.load_tensors(out / "export" / part), io.load_tensors(tmp_path / "whole" / "export" / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part
