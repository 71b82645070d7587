"""Stage V under `accelerate launch` with two CPU processes (data parallel over gloo), end to end.

`accelerate launch --cpu --num_processes 2` starts a single process unless mpirun is configured
(accelerate 1.15), so the test launches through torchrun (what `accelerate launch --multi_gpu` runs), in
standalone mode (a rendezvous port the system picks), with CUDA hidden; the Accelerator made with cpu=True
then joins the two processes as MULTI_CPU.
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

from trce.edit import load_patch
from trce.methods.stage_v import StageVConfig, erase_v
from trce.utils import io

PAIRS = [["a red circle", "a blue circle"], ["a red square", "a blue square"], ["a red star", "a green star"]]
SETTINGS = {"n_trajectories": 4, "n_uncond": 8, "ddim_steps": 6, "epochs": 1, "preserve_batch": 2,
            "cache_batch_size": 4, "lr": 1e-4, "checkpoint_every": 2, "batch_size": 1}


@pytest.mark.heavy
def test_two_process_run_matches_one_process_with_the_same_global_batch(tmp_path):
    worker = Path(__file__).with_name("stage_v_accelerate_worker.py")
    env = {**os.environ, "TRCE_TEST_THREADS": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONHASHSEED": "random"}  # processes must agree on cache keys whatever their hash seeds
    # torchrun, as `accelerate launch --multi_gpu` starts it, in standalone mode: a rendezvous port the operating
    # system picks, so runs side by side never collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(worker), str(tmp_path / "two"), json.dumps({**SETTINGS, "pairs": PAIRS})]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:  # never leave the launcher's workers behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-3000:]
    two = load_patch(tmp_path / "two" / "patch")
    assert two.info["num_processes"] == 2 and two.info["steps"] == 2  # 4 trajectories, global batch 2
    assert not list((tmp_path / "two" / "cache").rglob("step-*"))  # checkpoints removed after success

    # One process with batch 2 sees the same samples per step; DDP's gradient mean equals the batch mean.
    from trce.testing import tiny_pipeline

    one = erase_v(tiny_pipeline(0), [tuple(p) for p in PAIRS], StageVConfig(**{**SETTINGS, "batch_size": 2}),
                  cache_dir=tmp_path / "one", progress=False)
    assert one.info["steps"] == 2 and set(one.weights) == set(two.weights)
    for got, want in zip(two.info["loss_curve"], one.info["loss_curve"], strict=True):
        assert got == pytest.approx(want, abs=1e-6)
    # Adam divides each update by its gradient's own scale, so entries whose gradient is ~0 move by
    # ±lr on rounding noise alone; compare the updates as a whole, and each entry within a quarter
    # of the largest possible update (lr per step).
    base = dict(tiny_pipeline(0).unet.named_parameters())
    d_one = torch.cat([(v - base[p.removeprefix("unet.")]).flatten() for p, v in one.weights.items()])
    d_two = torch.cat([(two.weights[p] - base[p.removeprefix("unet.")]).flatten() for p in one.weights])
    assert torch.nn.functional.cosine_similarity(d_one, d_two, dim=0) > 0.999
    assert (d_one - d_two).abs().max() < 0.25 * SETTINGS["lr"] * one.info["steps"]
    # The cache the two processes built in halves and merged equals the one built in one piece.
    for kind in ("concept", "uncond"):
        (merged,), (single,) = ((tmp_path / d).rglob(f"{kind}-*.safetensors") for d in ("two", "one"))
        a, b = io.load_tensors(merged), io.load_tensors(single)
        assert merged.name == single.name and set(a) == set(b)
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4) for k in a), kind
