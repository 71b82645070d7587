"""Resumable, sharded JSON-lines records: what `trce eval` (one row per image) and `trce attack` (one result per
target) write as they go.

A run appends one JSON line per finished item to `folder/<name>.jsonl`, flushed and fsynced per batch, so a
kill loses at most the batch in flight; a line cut short is dropped on reading and its item redone. Under
`accelerate launch` each process appends to its own shard `<name>.rank{r}.jsonl` and the main process folds
the shards into the one file (`merge`). Every record carries a key field (`name` for images, `index` for
attack targets): the latest record of a key wins, so an item is never doubled.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from trce.utils import io
from trce.utils.io import read_jsonl
from trce.utils.processes import SingleState

log = logging.getLogger(__name__)
class Records:
    def __init__(self, path: str | os.PathLike, key: str, state=None, order: Callable[[dict], Any] | None = None):
        self.path = Path(path)
        self.key = key
        self.state = state if state is not None else SingleState()
        self.order = order or (lambda rec: rec[key])

    def _shards(self) -> list[Path]:
        return sorted(self.path.parent.glob(f"{self.path.stem}.rank*{self.path.suffix}"))

    def merge(self) -> dict[Any, dict]:
        """Fold the shards into the records file (main process; rewritten only when it changes). Returns all."""
        records: dict[Any, dict] = {}
        shards = self._shards()
        for f in [self.path, *shards]:
            for rec in read_jsonl(f):
                if self.key in rec:
                    records[rec[self.key]] = rec
        text = "".join(json.dumps(r) + "\n" for r in sorted(records.values(), key=self.order))
        if shards or (self.path.exists() and self.path.read_text(encoding="utf-8", errors="replace") != text):
            io.write_text(self.path, text)  # a finished run's file stays untouched
        for f in shards:
            f.unlink()
        return records

    def done(self) -> dict[Any, dict]:
        """Merge (main process), wait for every process, then every finished record by key."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.state.is_main_process:
            self.merge()
        self.state.wait_for_everyone()
        return {r[self.key]: r for r in read_jsonl(self.path) if self.key in r}

    @contextlib.contextmanager
    def appender(self) -> Iterator[Callable[[list[dict]], None]]:
        """`append(records)` writes a batch of records to this process's file, flushed and fsynced."""
        shard = self.path if self.state.num_processes == 1 else self.path.with_name(
            f"{self.path.stem}.rank{self.state.process_index}{self.path.suffix}")
        with contextlib.ExitStack() as stack:
            handles: list[int] = []

            def append(batch: list[dict]) -> None:
                # Unbuffered, so that nothing is left to flush on closing after a failed write. A full disk is one
                # clear line (`io.WriteError`); a line it cut short is dropped on reading and its item redone.
                data = "".join(json.dumps(r) + "\n" for r in batch).encode("utf-8")
                with io.disk_errors(shard):
                    if not handles:  # opened on the first batch: a process with nothing to do writes no file
                        handles.append(os.open(shard, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666))
                        stack.callback(os.close, handles[0])
                    fd = handles[0]
                    while data:
                        data = data[os.write(fd, data):]
                    os.fsync(fd)

            yield append

    def collect(self) -> dict[Any, dict]:
        """After every process appended: merge (main process) and read back every record by key."""
        self.state.wait_for_everyone()
        if self.state.is_main_process:
            self.merge()
        self.state.wait_for_everyone()
        return {r[self.key]: r for r in read_jsonl(self.path) if self.key in r}
