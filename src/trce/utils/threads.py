"""A sensible CPU thread budget for each trce process.

Two PyTorch jobs that each use every core of a 2-core machine do not run at half speed: their OpenMP threads
spin against each other and both run about ten times slower. `configure()` (called by the CLI before torch
starts) avoids that:

- an explicit `OMP_NUM_THREADS` (or `TRCE_THREADS`) is honoured as given;
- otherwise the CPUs this process may run on (`os.sched_getaffinity`) are shared among the trce processes
  running on the machine now (each registers its pid in a runtime folder while it lives) and among the
  processes of an `accelerate launch` (LOCAL_WORLD_SIZE), at least one thread each;
- OpenMP's wait policy is made passive (unless set), so that idle threads sleep instead of spinning.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or os.path.join("/tmp", f"trce-{os.getuid()}")
    return Path(base) / "trce-procs"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_processes(folder: Path | None = None) -> list[int]:
    """Pids of the trce processes registered and alive (stale entries are removed)."""
    folder = folder or _runtime_dir()
    pids = []
    for entry in folder.glob("*.pid") if folder.is_dir() else []:
        try:
            pid = int(entry.stem)
        except ValueError:
            continue
        if _alive(pid):
            pids.append(pid)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
    return pids


def register(folder: Path | None = None) -> None:
    """Count this process among the running trce processes until it exits."""
    folder = folder or _runtime_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        mine = folder / f"{os.getpid()}.pid"
        mine.write_text("")
    except OSError:
        return  # no runtime folder to share: the budget then counts this process alone
    atexit.register(lambda: mine.unlink(missing_ok=True))


def budget(folder: Path | None = None) -> tuple[int, str]:
    """(threads, why) for this process (see the module doc)."""
    for name in ("TRCE_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value), f"{name}={value}"
    cpus = available_cpus()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    if local > 1:
        return max(1, cpus // local), f"{cpus} CPUs shared by {local} accelerate processes"
    others = [p for p in running_processes(folder) if p != os.getpid()]
    share = max(1, cpus // (len(others) + 1))
    return share, f"{cpus} CPUs shared with {len(others)} other trce process(es)" if others else f"{cpus} CPUs"


def configure(folder: Path | None = None) -> int:
    """Register this process, set OpenMP's wait policy and torch's thread count; returns the thread count.

    Call before torch is imported for the wait policy to take effect (the CLI does); the thread count is
    applied either way."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    register(folder)
    threads, why = budget(folder)
    import torch

    torch.set_num_threads(threads)
    log.debug("torch uses %d thread(s): %s", threads, why)
    return threads
