"""The thread budget: an explicit OMP_NUM_THREADS wins; otherwise the CPUs are shared among running trce processes
and among the processes of an accelerate launch."""

from __future__ import annotations

import os

from trce.utils import threads


def test_explicit_setting_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.budget(tmp_path) == (3, "OMP_NUM_THREADS=3")
    monkeypatch.setenv("TRCE_THREADS", "1")
    assert threads.budget(tmp_path)[0] == 1


def test_cpus_are_shared_with_running_trce_processes(monkeypatch, tmp_path):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("TRCE_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(threads, "available_cpus", lambda: 4)
    assert threads.budget(tmp_path)[0] == 4
    (tmp_path / f"{os.getppid()}.pid").write_text("")  # another live trce process
    (tmp_path / "999999999.pid").write_text("")  # a dead one: ignored and removed
    n, why = threads.budget(tmp_path)
    assert n == 2 and "1 other" in why and not (tmp_path / "999999999.pid").exists()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.budget(tmp_path)[0] == 1


def test_configure_registers_and_sets_torch(monkeypatch, tmp_path):
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    try:
        assert threads.configure(tmp_path) == 1 and torch.get_num_threads() == 1
        assert (tmp_path / f"{os.getpid()}.pid").exists()
    finally:
        torch.set_num_threads(before)
