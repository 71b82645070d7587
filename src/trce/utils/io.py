"""Atomic file output, safetensors-only state, and run records.

Every file trce writes goes through a temporary file in the same folder followed by `os.replace`,
so an interrupted run never leaves a half-written output behind. Weights and optimizer state are
stored as safetensors + JSON: nothing trce reads is ever unpickled.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trce.errors import TrceError


@contextlib.contextmanager
def _disk_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise TrceError(f"disk full while writing {path}; free space and rerun (finished work is kept)") from exc
        if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise TrceError(f"cannot write {path}: {exc.strerror}") from exc
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    with _disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        try:
            yield tmp_path
            os.replace(tmp_path, path)
        finally:
            if tmp_path.exists():
                tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` as a whole."""
    path = Path(path)
    with _disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            yield tmp
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def jsonable(obj: Any) -> Any:
    """`obj` as it reads back from JSON (tuples become lists, other objects strings): comparable to read_json."""
    return json.loads(json.dumps(obj, default=str))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise TrceError(f"missing file {path}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrceError(f"corrupt JSON in {path}: {exc}") from exc


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write a safetensors file (tensors made contiguous and detached)."""
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing or truncated file is one clear error."""
    path = Path(path)
    if not path.exists():
        raise TrceError(f"missing weights file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TrceError(f"corrupt or truncated safetensors file {path}: {exc}") from exc


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state into tensors (for safetensors) and JSON-able scalars."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value) and value.ndim > 0:
                tensors[f"{idx}.{name}"] = value
            else:
                scalars["state"].setdefault(str(idx), {})[name] = value.item() if torch.is_tensor(value) else value
    return tensors, scalars


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in scalars["state"].items():
        for name, value in values.items():
            state.setdefault(int(idx), {})[name] = torch.tensor(float(value))
    optimizer.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})


def git_hash() -> str | None:
    """The git commit of the trce source tree, when it runs from a checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def versions() -> dict[str, str]:
    import diffusers
    import transformers

    import trce

    return {
        "trce": trce.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def run_record(config: Any = None, seeds: Any = None, **extra: Any) -> dict:
    """What every output folder records: config, seeds, versions, git hash, date, command line."""
    return {
        "config": config,
        "seeds": seeds,
        "versions": versions(),
        "git_hash": git_hash(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
        **extra,
    }


def save_png(path: str | os.PathLike, image) -> None:
    """Atomically write a uint8 (H, W, 3) array as PNG."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every complete JSON line of `path` (a missing file is empty; a line cut short by a kill is dropped)."""
    import logging

    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            logging.getLogger(__name__).info("%s: dropping an incomplete line (an interrupted run); it is redone", path)
    return out


def check_folder(path: str | os.PathLike | None, what: str) -> None:
    """A folder to write into: it may be missing (it is made), but not a file."""
    if path is not None and Path(path).expanduser().exists() and not Path(path).expanduser().is_dir():
        raise TrceError(f"{what} {path} is a file, not a folder; give a folder path", field=what)


def check_run_key(path: str | os.PathLike, key: dict, state, what: str) -> None:
    """Refuse to mix results made with other settings into a resumed run folder.

    `path` (e.g. `out/eval.json`) records the settings the folder's results depend on; the first run
    writes it, every later run must match it. `what` names the run in the error ("an evaluation").
    """
    path = Path(path)
    if path.exists():
        old = read_json(path).get("key", {})
        diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
        if diff:
            raise TrceError(f"{path.parent} holds {what} made with other {', '.join(diff)}; use another --out "
                            "or delete that folder")
    state.wait_for_everyone()
    if state.is_main_process and not path.exists():
        write_json(path, {"key": key})
