"""Cache files that cannot poison results: safetensors written with the key they were made for and a checksum of
their contents, and read back only when both match.

A cache file that is missing, truncated, corrupted (one flipped byte changes the checksum), written by another
cache format or for another key (another base model, other settings) is reported in one log line, removed and
rebuilt by the caller; it is never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from trce.utils import io

log = logging.getLogger(__name__)

FORMAT = "trce-cache-2"


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes (in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _key_text(key: Any) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def save(path: str | Path, tensors: dict[str, torch.Tensor], key: Any, **metadata: str) -> bool:
    """Write `tensors` atomically with `key` and their checksum in the file's metadata. A cache that cannot be
    written (read-only, full disk, a file where the folder should be) is skipped with one log line: False."""
    from trce.errors import TrceError

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        io.save_tensors(path, clean, metadata={"format": FORMAT, "key": _key_text(key), "sha256": digest(clean),
                                               **{k: str(v) for k, v in metadata.items()}})
    except (OSError, TrceError) as exc:
        log.warning("cannot write the cache file %s (%s): carrying on without it", path, str(exc).splitlines()[0])
        return False
    return True


def load(path: str | Path, key: Any, what: str) -> dict[str, torch.Tensor] | None:
    """The tensors of `path` when it was written by `save` for `key` and is intact; else None (and the file is
    removed, with one log line saying why: the caller rebuilds it)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        return None
    problem = None
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # noqa: BLE001 (a truncated or foreign file: safetensors raises several types)
        problem = f"unreadable ({str(exc).splitlines()[0][:80]})"
    else:
        if meta.get("format") != FORMAT:
            problem = f"written by another cache format ({meta.get('format')!r})"
        elif meta.get("key") != _key_text(key):
            problem = "made for other settings or another base model"
        elif meta.get("sha256") != digest(tensors):
            problem = "corrupt (checksum mismatch)"
    if problem is None:
        return tensors
    log.warning("%s cache %s is %s: rebuilding it", what, path, problem)
    path.unlink(missing_ok=True)
    return None
