"""Atomic file output, safetensors-only state, and run records.

Every file trce writes goes through a temporary file in the same folder followed by `os.replace`,
so an interrupted run never leaves a half-written output behind. Weights and optimizer state are
stored as safetensors + JSON: nothing trce reads is ever unpickled.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import platform
import re
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

log = logging.getLogger(__name__)


class WriteError(TrceError):
    """A file could not be written: the disk is full or the place is read-only (`errno` says which)."""

    def __init__(self, path: Path, code: int, reason: str = ""):
        self.path, self.errno = Path(path), code
        if code == errno.ENOSPC:
            text = f"disk full while writing {path}; free space and rerun (finished work is kept)"
        else:
            text = f"cannot write {path}: {reason or os.strerror(code)}"
        super().__init__(text)


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM, errno.ENOTDIR)


def _write_errno(exc: BaseException) -> int | None:
    """The errno of a failed write: an OSError's, or the one inside a SafetensorError's text (safetensors reports
    a full disk as "I/O error: No space left on device (os error 28)")."""
    if isinstance(exc, OSError):
        return exc.errno
    if isinstance(exc, SafetensorError):
        found = re.search(r"os error (\d+)", str(exc))
        return int(found.group(1)) if found else None
    return None


@contextlib.contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Turn a full disk or a read-only place while writing `path` into one clear `WriteError` naming `path`."""
    try:
        yield
    except WriteError as exc:
        if exc.path != path:  # a file inside a folder written as a whole: name the folder the user asked for
            raise WriteError(path, exc.errno) from exc
        raise
    except (OSError, SafetensorError) as exc:
        code = _write_errno(exc)
        if code not in _WRITE_ERRNOS:
            raise
        reason = "a file stands where a folder should be" if code == errno.ENOTDIR else ""
        raise WriteError(path, errno.ENOSPC if code == errno.EDQUOT else code,
                         reason or getattr(exc, "strerror", None) or "") from exc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_TEMP_ROOM = 8 + len(".tmp")  # what tempfile adds to a prefix: 8 random characters, then our suffix


def name_max(folder: str | os.PathLike) -> int:
    """The longest name (in bytes) a file or folder may have in `folder`, or in the nearest existing folder above it
    (255 on most file systems)."""
    probe = Path(folder)
    while not os.path.isdir(probe) and probe != probe.parent:
        probe = probe.parent
    try:
        return int(os.pathconf(probe, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows), or the file system does not say
        return 255


def sibling_name(path: str | os.PathLike, prefix: str = ".", suffix: str = "", *, room: int = 0) -> str:
    """The name `prefix + NAME + suffix` of what trce keeps beside `path` (its lock, a temporary copy, the old
    folder being replaced). Where that name, with `room` more bytes (the random part of a temporary name), would
    pass the file system's limit on a name, a shorter one: NAME's first bytes, `~` and a hash of all of NAME (the
    same in every process, so that two runs on one long --out still find one lock)."""
    path = Path(path)
    limit = name_max(path.parent)
    name = f"{prefix}{path.name}{suffix}"
    if len(os.fsencode(name)) + room <= limit:
        return name
    raw = os.fsencode(path.name)
    digest = hashlib.sha256(raw).hexdigest()[:16]
    keep = max(0, limit - room - len(os.fsencode(prefix + suffix)) - len(digest) - 1)
    return f"{prefix}{raw[:keep].decode('utf-8', 'ignore')}~{digest}{suffix}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=sibling_name(path, ".", ".", room=_TEMP_ROOM), suffix=".tmp",
                                   dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            # mkstemp makes 0600 and some writers (safetensors) replace the file: outputs get the usual mode
            os.chmod(tmp_path, 0o666 & ~_umask())
            os.replace(tmp_path, path)
        finally:
            if tmp_path.exists():
                tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` as a whole."""
    path = Path(os.path.abspath(os.path.expanduser(path)))  # `.` or `x/..` has a parent to write beside
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=sibling_name(path, ".", ".", room=_TEMP_ROOM), suffix=".tmp",
                                    dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            yield tmp
            # safetensors (save_pretrained) writes 0600 files: everything in the folder gets the usual modes
            for sub in tmp.rglob("*"):
                if not sub.is_symlink():
                    os.chmod(sub, (0o777 if sub.is_dir() else 0o666) & ~_umask())
            if path.exists():
                old = path.with_name(sibling_name(path, ".", ".old"))
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

    from trce.version import __version__

    return {
        "trce": __version__,
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
            log.info("%s: dropping an incomplete line (an interrupted run); it is redone", path)
    return out


def check_path(path: str | os.PathLike, field: str) -> None:
    """Refuse a path no file can be made at: a name longer than the file system takes (255 bytes on most), a path
    longer than it takes, a loop of symbolic links, a symbolic link to nothing. Other problems (a missing folder,
    a file in the way, a read-only place) are left to the caller."""
    target = Path(path).expanduser()
    limit = name_max(target.parent)
    for part in target.parts:
        size = len(os.fsencode(part))
        if size > limit:
            raise TrceError(f"{field} {path} has a name of {size} bytes; a file or folder name is at most {limit} "
                            "bytes on this file system: choose a shorter name", field=field)
    try:
        os.stat(target)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise TrceError(f"{field} {path} leads into a loop of symbolic links; remove the loop or choose another "
                            "path", field=field) from None
        if exc.errno == errno.ENAMETOOLONG:
            raise TrceError(f"{field} {path} is too long a path for this file system "
                            f"({len(os.fsencode(str(target)))} bytes); choose a shorter one", field=field) from None
        if exc.errno == errno.ENOENT and os.path.islink(target):
            raise TrceError(f"{field} {path} is a symbolic link to {os.readlink(target)}, which does not exist; "
                            "remove the link or choose another path", field=field) from None


def check_folder(path: str | os.PathLike | None, what: str) -> None:
    """A folder to write into: it may be missing (it is made), but not a file (nor a path `check_path` refuses)."""
    if path is None:
        return
    check_path(path, what)
    if Path(path).expanduser().exists() and not Path(path).expanduser().is_dir():
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


def check_writable(path: str | os.PathLike, field: str, *, kind: str = "folder", replace: bool = False) -> None:
    """Refuse, before any work, an output that cannot be written: a file where a folder must be (or the reverse),
    a read-only place, a path `check_path` refuses. The nearest existing folder at or above the output must take a
    new file (a probe file is made and removed); the output itself may be missing (it is made). `kind` is "folder"
    or "file"; `replace`: a folder written as a whole (a patch) is made beside the old one, so its parent must take
    it. An output written beside and renamed over (`replace`, and every file) must not be a symbolic link: the rename
    would put the output in the link's place and leave what it points to as it was."""
    check_path(path, field)
    target = Path(path).expanduser()
    if target.is_symlink() and (replace or kind == "file"):
        what = "folder" if kind == "folder" else "file"
        raise TrceError(f"{field} {path} is a symbolic link (to {os.readlink(target)}); the {what} is written beside "
                        f"it and renamed over it, which would replace the link, not what it points to: give the "
                        f"{what} itself ({target.resolve()})", field=field)
    if target.exists() and kind == "folder" and not target.is_dir():
        raise TrceError(f"{field} {path} is a file, not a folder; give a folder path", field=field)
    if target.is_dir() and kind == "file":
        raise TrceError(f"{field} {path} is a folder; give a file path", field=field)
    probe = target if kind == "folder" and not replace else target.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise TrceError(f"{field} {path}: {probe} is a file, not a folder", field=field)
    try:
        fd, name = tempfile.mkstemp(prefix=".trce-write-test-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise TrceError(f"{field} {path} cannot be written ({probe}: {exc.strerror}); choose a writable place",
                        field=field) from exc


def usable_folder(path: str | os.PathLike) -> str | None:
    """None when `path` can be made and written into (a probe file is made and removed), else why not."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        return "it is a file, not a folder"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".trce-write-test-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


_HELD: dict[Path, int] = {}  # locks this process holds, by target: run_lock is re-entrant


@contextlib.contextmanager
def run_lock(path: str | os.PathLike, field: str = "out", *, wait: bool = False) -> Iterator[None]:
    """Hold the lock of output `path` for the block, so that two trce processes never write one output at once.

    The lock is `.NAME.lock` beside `path` (`_lock_file`), taken with `flock`: the operating system releases it when
    its process ends, however it ends, so a run killed with `kill -9` never blocks the next one (the file it leaves is
    reused).
    Another process holding it: one clear error naming that process, or with `wait` (a shared cache), waiting for
    it. Re-entrant within a process; where the file system takes no locks, the run goes on unlocked.
    """
    target = Path(path).expanduser().resolve()
    if target in _HELD:
        _HELD[target] += 1
        try:
            yield
        finally:
            _HELD[target] -= 1
        return
    lock = _lock_file(target)
    fd = _acquire(lock, path, field, wait)
    _HELD[target] = 1
    try:
        yield
    finally:
        del _HELD[target]
        if fd is not None:
            with contextlib.suppress(OSError):
                lock.unlink()
            os.close(fd)


def _lock_file(target: Path) -> Path:
    """`.NAME.lock` beside `target` (a shorter name with a hash of NAME where that one would be too long for the file
    system, see `sibling_name`); inside it (`.trce.lock`) when `target` is a folder whose parent cannot be written
    (`--out .` in a read-only home): the same answer for every process that asks."""
    beside = target.parent / sibling_name(target, ".", ".lock")
    try:
        beside.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(beside, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask()))
    except OSError as exc:
        if target.is_dir() and exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            return target / ".trce.lock"
        with disk_errors(beside):
            raise
    return beside


def _acquire(lock: Path, path, field: str, wait: bool) -> int | None:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): unlocked
        return None
    while True:
        with disk_errors(lock):
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise
                log.info("%s is being written by another trce process (%s); waiting for it", path, _lock_holder(fd))
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise TrceError(f"{field} {path} is being written by another trce process ({holder}); wait for it to "
                            "finish or choose another folder", field=field) from None
        except OSError as exc:  # a file system without locks (some network mounts)
            os.close(fd)
            log.debug("no lock for %s (%s): going on without one", path, exc)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a file its previous holder removed while this process waited for it
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv[:3]),
                             "started": _dt.datetime.now().isoformat(timespec="seconds")}).encode())
    return fd


def _lock_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']}, {info.get('command') or 'trce'}, started {info.get('started', '?')}"
    except (OSError, ValueError, KeyError, TypeError):
        return "pid unknown"
