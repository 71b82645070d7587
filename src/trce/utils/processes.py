"""One process or many: accelerate's PartialState when launched with several, else a stand-in.

Shared by evaluation, attacks and training so that `accelerate launch` shards work with the same
command, and a plain single-process run never touches accelerate's global state.
"""

from __future__ import annotations

import contextlib
import os


class SingleState:
    """PartialState's interface for one process."""

    num_processes = 1
    process_index = 0
    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass

    @contextlib.contextmanager
    def split_between_processes(self, items):
        yield items


def process_state(cpu: bool | None = None):
    """accelerate's PartialState when launched with several processes, else a `SingleState`.

    `cpu=None` means: on the CPU when no CUDA device is available.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) != -1
    if not launched:
        return SingleState()
    import torch
    from accelerate import PartialState

    return PartialState(cpu=(not torch.cuda.is_available()) if cpu is None else cpu)
