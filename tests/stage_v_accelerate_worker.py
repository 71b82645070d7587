"""Run by tests/test_stage_v_accelerate.py under `accelerate launch`: one tiny stage V run.

usage: CUDA_VISIBLE_DEVICES= python -m torch.distributed.run --standalone --nproc-per-node 2 \
           tests/stage_v_accelerate_worker.py OUT JSON      (or: accelerate launch --multi_gpu --num_processes 2 ...)
(`accelerate launch --cpu --num_processes 2` starts ONE process unless mpirun is set up; the
torchrun path above starts two, and an Accelerator made with cpu=True joins them over gloo.)
Writes OUT/patch (the Edit) from the main process; the cache goes to OUT/cache.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def main(out: str, config_json: str) -> None:
    torch.set_num_threads(int(os.environ.get("TRCE_TEST_THREADS", "1")))
    from accelerate import PartialState

    from trce.methods.stage_v import StageVConfig, erase_v
    from trce.testing import tiny_pipeline

    state = PartialState(cpu=True)  # first: accelerate's process state is set up once per process
    pipe = tiny_pipeline(0).to(state.device)
    settings = json.loads(config_json)
    pairs = [tuple(p) for p in settings.pop("pairs")]
    edit = erase_v(pipe, pairs, StageVConfig(**settings), cache_dir=Path(out) / "cache", progress=False)
    if state.is_main_process:
        edit.save(Path(out) / "patch")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
