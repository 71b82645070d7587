"""The hostile-input catalogue: what a new user can get wrong, and what a machine can do to a run.

Each row is one case: the command line, the exit status, a regular expression the one `trce: error:` line must
match (None: the command must succeed), and the files that must not exist afterwards. `setup` prepares the case
(files, a monkeypatched fault, environment variables); `check` looks at what the command left behind. Cases that
need two processes or a signal are the tests after the table. The catalogue goes on in test_hostile_checks.py
(ranges and paths checked before work), test_hostile_api.py (the Python calls), test_folders.py (folders of
another kind or key, eval resume at another --limit), test_hostile_report.py and test_ship.py.

Placeholders in the arguments: {tmp} (the case's folder), {tiny} (a tiny diffusers pipeline), {patch} (a good
patch of {tiny}), {other} (a patch of another base model). Every case runs on the tiny pipeline with one or two
steps and a prompt or a few, and most are refused before any model loads (`no_model_load` makes sure of it), so
the whole file takes about half a minute on one CPU core.

Faults: a full disk and a read-only folder are real tmpfs mounts where the machine allows them (as root), else
simulated (ENOSPC and EROFS from the writes under that folder); a normal user's read-only folder is a chmod.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from trce.utils import io


# --------------------------------------------------------------------------- shared inputs
@pytest.fixture(scope="module")
def inputs(tiny_dir, tmp_path_factory):
    """A good patch of the tiny pipeline and one of another base model (same architecture, other weights)."""
    import trce
    from trce.testing import tiny_pipeline

    root = tmp_path_factory.mktemp("hostile")
    cache = root / "cache"
    good = trce.erase(trce.load_pipeline(str(tiny_dir)), "shapeworld-red", stages="T", cache=cache, progress=False)
    good.save(root / "patch")
    other_pipe = tiny_pipeline(seed=1)
    other = trce.erase(other_pipe, "shapeworld-red", stages="T", cache=cache, progress=False)
    other.save(root / "other")
    return SimpleNamespace(tiny=tiny_dir, patch=root / "patch", other=root / "other")


@dataclass
class Case:
    """What a row's setup and check see."""

    tmp: Path
    inputs: SimpleNamespace
    monkeypatch: pytest.MonkeyPatch
    caplog: pytest.LogCaptureFixture
    out: str = ""
    err: str = ""
    elapsed: float = 0.0
    cleanups: list = field(default_factory=list)  # run after the case, however it ended
    keep: list = field(default_factory=list)  # lock files the setup holds (the case must leave no other)

    def copy_patch(self, name: str = "p") -> Path:
        dst = self.tmp / name
        shutil.copytree(self.inputs.patch, dst)
        return dst


@dataclass(frozen=True)
class Row:
    id: str
    args: tuple[str, ...]
    error: str | None  # regex the one `trce: error:` line must match; None: exit status 0
    absent: tuple[str, ...] = ()  # paths under {tmp} that must not exist afterwards
    setup: Callable[[Case], None] | None = None
    check: Callable[[Case], None] | None = None
    code: int | None = None  # default: 2 with an error, else 0


def row(id: str, command: str, error: str | None, *, absent=(), setup=None, check=None, code=None) -> Row:
    """A row from a command line (split on spaces)."""
    return Row(id, tuple(command.split()), error, tuple(absent), setup, check, code)


EVAL = "eval --model {tiny} --steps 1 --detector none --no-progress --device cpu"
EVAL_RED = "eval --model {tiny} --suite shapeworld-red --limit 1 --steps 1 --no-progress --device cpu"
ERASE = "erase --model {tiny} --concept shapeworld-red --stages T"
GEN = "generate --model {tiny} --steps 1 --prompt x"


# --------------------------------------------------------------------------- setups
def write(name: str, content: str | bytes) -> Callable[[Case], None]:
    def setup(case: Case) -> None:
        path = case.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return setup


def folder(name: str) -> Callable[[Case], None]:
    return lambda case: (case.tmp / name).mkdir(parents=True)


def both(*setups) -> Callable[[Case], None]:
    def setup(case: Case) -> None:
        for s in setups:
            s(case)
    return setup


def env(name: str, value: str) -> Callable[[Case], None]:
    return lambda case: case.monkeypatch.setenv(name, value.format(tmp=case.tmp))


def edit_patch_json(change) -> Callable[[Case], None]:
    """A copy of the good patch at {tmp}/p whose patch.json is rewritten by `change(meta)` (returns the new JSON)."""
    def setup(case: Case) -> None:
        p = case.copy_patch()
        meta = json.loads((p / "patch.json").read_text())
        new = change(meta)
        (p / "patch.json").write_text(json.dumps(meta if new is None else new))
    return setup


def edit_weights(change) -> Callable[[Case], None]:
    """A copy of the good patch at {tmp}/p whose weights.safetensors bytes are rewritten by `change(bytes)`;
    `fix_checksum` keeps patch.json's checksum consistent (a patch that lies about nothing but its tensors)."""
    def setup(case: Case) -> None:
        from trce.edit import _sha256

        p = case.copy_patch()
        data = (p / "weights.safetensors").read_bytes()
        new, fix_checksum = change(data)
        (p / "weights.safetensors").write_bytes(new)
        if fix_checksum:
            meta = json.loads((p / "patch.json").read_text())
            meta["files"]["weights.safetensors"] = _sha256(p / "weights.safetensors")
            (p / "patch.json").write_text(json.dumps(meta))
    return setup


def pickled(data: bytes) -> tuple[bytes, bool]:
    import io as _io

    buf = _io.BytesIO()
    torch.save({"x": torch.zeros(3)}, buf)
    return buf.getvalue(), True


def flip_byte(data: bytes) -> tuple[bytes, bool]:
    b = bytearray(data)
    b[-5] ^= 0xFF  # inside the last tensor's data
    return bytes(b), False


def read_only(name: str) -> Callable[[Case], None]:
    """Make {tmp}/name a folder no file can be written into: chmod for a normal user; as root (which chmod does
    not stop) a read-only tmpfs mounted there, or where mounting is not allowed the same refusal, simulated:
    creating anything inside it fails with EROFS."""
    def setup(case: Case) -> None:
        path = case.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            path.chmod(0o555)
            case.cleanups.append(lambda: path.chmod(0o755))
        elif _mount_tmpfs(path, "16k", "ro"):
            case.cleanups.append(lambda: subprocess.run(["umount", "-l", str(path)], check=False))
        else:
            simulate_fault(case, path, errno.EROFS)
    return setup


def simulate_fault(case: Case, path: Path, code: int) -> None:
    """Every file or folder created under `path` fails with OSError(code) (a read-only mount, a full disk)."""
    import tempfile

    def inside(p) -> bool:
        try:
            return Path(p).resolve().is_relative_to(path.resolve())
        except (TypeError, ValueError):
            return False

    def fail(where):
        raise OSError(code, os.strerror(code), str(where))

    real_mkstemp, real_mkdtemp, real_open, real_mkdir = tempfile.mkstemp, tempfile.mkdtemp, open, Path.mkdir

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and inside(dir):
            fail(dir)
        return real_mkstemp(*args, dir=dir, **kwargs)

    def mkdtemp(*args, dir=None, **kwargs):
        if dir is not None and inside(dir):
            fail(dir)
        return real_mkdtemp(*args, dir=dir, **kwargs)

    def mkdir(self, *args, **kwargs):
        if inside(self) and not self.exists():
            fail(self)
        return real_mkdir(self, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and inside(file):
            fail(file)
        return real_open(file, mode, *args, **kwargs)

    case.monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    case.monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    case.monkeypatch.setattr(Path, "mkdir", mkdir)
    case.monkeypatch.setattr("builtins.open", open_)


def full_disk(name: str) -> Callable[[Case], None]:
    """{tmp}/name is a 16 KiB disk: a real tmpfs where the machine lets the test mount one (as root), else a
    simulated one where the second file written under it fails as a full disk does (OSError ENOSPC from Python's
    writes, safetensors' own SafetensorError "os error 28")."""
    def setup(case: Case) -> None:
        path = case.tmp / name
        path.mkdir()
        if _mount_tmpfs(path, "16k"):
            case.cleanups.append(lambda: subprocess.run(["umount", "-l", str(path)], check=False))
            return
        from PIL import Image
        from safetensors import SafetensorError

        real_save_file, real_image_save, written = io.save_file, Image.Image.save, []

        def inside(p) -> bool:
            return isinstance(p, (str, os.PathLike)) and Path(p).resolve().is_relative_to(path.resolve())

        def save_file(tensors, filename, metadata=None):
            if inside(filename):
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real_save_file(tensors, filename, metadata=metadata)

        def image_save(self, fp, *args, **kwargs):
            if inside(fp):
                written.append(fp)
                if len(written) > 1:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))
            return real_image_save(self, fp, *args, **kwargs)

        case.monkeypatch.setattr(io, "save_file", save_file)
        case.monkeypatch.setattr(Image.Image, "save", image_save)
    return setup


def _mount_tmpfs(path: Path, size: str, *options: str) -> bool:
    """Mount a tmpfs of `size` at `path` (root only; False where the machine does not allow it)."""
    if os.geteuid() != 0 or shutil.which("mount") is None or os.environ.get("TRCE_TEST_NO_MOUNT"):
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                          check=False, capture_output=True)
    return done.returncode == 0


def hold_lock(name: str) -> Callable[[Case], None]:
    """Another process writes {tmp}/name: its lock is held (flock on another open file, as that process would)."""
    def setup(case: Case) -> None:
        import fcntl

        lock = case.tmp / f".{name}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps({"pid": 4242, "command": "trce eval", "started": "2025-01-01T00:00:00"}).encode())
        case.keep.append(lock)
        case.cleanups.append(lambda: os.close(fd))
    return setup


def stale_lock(name: str) -> Callable[[Case], None]:
    """A lock file left by a run killed with kill -9 (its process is gone, so nothing holds the lock)."""
    return write(f".{name}.lock", json.dumps({"pid": 999999, "command": "trce eval", "started": "2025-01-01"}))


def out_of_memory(case: Case) -> None:
    """The device runs out of memory drawing the image (what a large --size does on a small GPU)."""
    from diffusers import StableDiffusionPipeline

    def call(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    case.monkeypatch.setattr(StableDiffusionPipeline, "__call__", call)


def no_model_load(case: Case) -> None:
    """Loading a model fails the test: the case must be refused before any work."""
    import trce.loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    case.monkeypatch.setattr(trce.loading, "load_pipeline", refuse)


def run_first(*args: str) -> Callable[[Case], None]:
    """Run a command first (it must succeed), e.g. the run whose folder the case then reuses."""
    def setup(case: Case) -> None:
        from trce.cli import main

        fmt = _formatter(case)
        assert main([fmt(a) for a in args]) == 0
    return setup


def _formatter(case: Case):
    values = {"tmp": case.tmp, "tiny": case.inputs.tiny, "patch": case.inputs.patch, "other": case.inputs.other}
    return lambda a: a.format(**values)


# --------------------------------------------------------------------------- checks
def rows_of(out: str) -> Callable[[Case], list[dict]]:
    return lambda case: [json.loads(x) for x in (case.tmp / out / "rows.jsonl").read_text().splitlines()]


def prompt_is(out: str, prompt: str) -> Callable[[Case], None]:
    def check(case: Case) -> None:
        rows = rows_of(out)(case)
        assert [r["prompt"] for r in rows] == [prompt]
    return check


def logged(pattern: str) -> Callable[[Case], None]:
    def check(case: Case) -> None:
        assert re.search(pattern, case.caplog.text), case.caplog.text
    return check


def unchanged_rows(out: str) -> Callable[[Case], None]:
    def check(case: Case) -> None:
        rows = rows_of(out)(case)
        assert len(rows) == 1 and {r["name"] for r in rows} == {"00000"}
        assert json.loads((case.tmp / out / "trce.json").read_text())["key"]["steps"] == 1
    return check


def complete_rows(out: str) -> Callable[[Case], None]:
    """Every line of rows.jsonl is whole and its image is there (a full disk cut the run, not a row)."""
    def check(case: Case) -> None:
        rows = rows_of(out)(case)
        assert len(rows) < 4
        for r in rows:
            assert (case.tmp / out / "images" / f"{r['name']}.png").stat().st_size > 0
    return check


def patch_loads(**settings) -> Callable[[Case], None]:
    def check(case: Case) -> None:
        from trce.edit import load_patch

        edit = load_patch(case.tmp / "p")
        for key, value in settings.items():
            assert edit.settings[key] == value
    return check


def fast(seconds: float) -> Callable[[Case], None]:
    return lambda case: case.elapsed < seconds or pytest.fail(f"took {case.elapsed:.1f} s")


def report_escapes(case: Case) -> None:
    html = (case.tmp / "r.html").read_text(encoding="utf-8")
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def file_kept(name: str, text: str) -> Callable[[Case], None]:
    return lambda case: (case.tmp / name).read_text() == text or pytest.fail(f"{name} was changed")


def no_temporaries(case: Case) -> None:
    left = [p.name for p in case.tmp.rglob(".*.tmp")]
    assert not left, left


LONG = "a red star " * 909 + "x"  # 10,000 characters
SCRIPT = "<script>alert(1)</script> a red star"
SPEC = "name: mine\nerase: {{target: a shape, expressions: [a red circle]}}\ntemplates: ['{{}}']\n{extra}"

ROWS: list[Row] = [
    # ---------------------------------------------------------------- names
    row("model-unknown", GEN.replace("{tiny}", "no-such-model") + " --out {tmp}/x.png", r"unknown model 'no-such-model'",
        absent=["x.png"]),
    row("model-misspelled", "info --model shapewrld", r"unknown model 'shapewrld'.*did you mean 'shapeworld'"),
    row("concept-misspelled", "erase --model {tiny} --concept shapeworld-rde --out {tmp}/p",
        r"unknown concept 'shapeworld-rde' \(did you mean 'shapeworld-red'\?\)", absent=["p"], setup=no_model_load),
    row("method-unknown", ERASE + " --method esdx --out {tmp}/p", r"unknown method 'esdx'.*available: advunlearn, esd, kpop",
        absent=["p"], setup=no_model_load),
    row("stage-unknown", "erase --model {tiny} --concept shapeworld-red --stages T,W --out {tmp}/p",
        r"method 'trce' has no stage 'W'", absent=["p"], setup=no_model_load),
    row("suite-unknown", "eval --model {tiny} --suite shapeworld-rd --out {tmp}/o",
        r"unknown suite 'shapeworld-rd' \(did you mean 'shapeworld-red'\?\)", absent=["o"], setup=no_model_load),
    row("attack-unknown", "attack --model {tiny} --suite shapeworld-red --attack ringabell --out {tmp}/a",
        r"unknown attack 'ringabell'.*ring-a-bell", absent=["a"], setup=no_model_load),
    row("detector-unknown", EVAL_RED + " --detector nudnet --out {tmp}/o", r"unknown detector 'nudnet'",
        absent=["o"], setup=no_model_load),
    row("token-role-unknown", ERASE + " --token-role eos --out {tmp}/p", r"unknown token role 'eos'",
        absent=["p"], setup=no_model_load),
    row("set-key-unknown", ERASE + " --stages T,V --set V.epoch=1 --out {tmp}/p",
        r"unknown V setting 'epoch' \(did you mean 'epochs'\?\)", absent=["p"], setup=no_model_load),
    row("set-malformed", ERASE + " --set V.epochs --out {tmp}/p", r"bad --set 'V.epochs'; use STAGE.KEY=VALUE",
        absent=["p"], setup=no_model_load),
    # ---------------------------------------------------------------- values
    row("eta-negative", ERASE + " --eta -1 --out {tmp}/p", r"^--eta must be a number >= 0", absent=["p"],
        setup=no_model_load),
    row("lr-zero", ERASE + " --stages T,V --set V.lr=0 --out {tmp}/p", r"lr must be positive, got 0",
        absent=["p"], setup=no_model_load),
    row("steps-zero", EVAL_RED + " --steps 0 --out {tmp}/o", r"^--steps must be at least 1, got 0", absent=["o"],
        setup=no_model_load),
    row("limit-negative", EVAL_RED + " --limit -1 --out {tmp}/o", r"^--limit must be at least 1, got -1",
        absent=["o"], setup=no_model_load),
    row("guidance-nan", EVAL_RED + " --guidance nan --out {tmp}/o", r"^--guidance must be a finite number >= 0 .*, got nan",
        absent=["o"], setup=no_model_load),
    row("guidance-inf", GEN + " --guidance inf --out {tmp}/x.png", r"^--guidance must be a finite number >= 0 .*, got inf",
        absent=["x.png"], setup=no_model_load),
    row("guidance-negative", EVAL_RED + " --guidance -3 --out {tmp}/o",
        r"^--guidance must be a finite number >= 0 .*, got -3", absent=["o"], setup=no_model_load),
    row("size-not-multiple-of-8", EVAL_RED + " --size 12 --out {tmp}/o", r"^--size must be a positive multiple of 8 .*, got 12",
        absent=["o"], setup=no_model_load),
    row("size-absurd", GEN + " --size 100000 --out {tmp}/x.png", r"^--size must be at most 2048, got 100000",
        absent=["x.png"], setup=no_model_load),
    row("size-zero", GEN + " --size 0 --out {tmp}/x.png", r"^--size must be a positive multiple of 8 .*, got 0",
        absent=["x.png"], setup=no_model_load),
    row("steps-above-the-scheduler", EVAL_RED + " --steps 5000 --out {tmp}/o",
        r"^--steps must be at most 1000 \(the scheduler's training steps\), got 5000", absent=["o"]),
    row("out-of-memory", GEN + " --size 1024 --out {tmp}/x.png",
        r"^--size 1024x1024 does not fit in memory on cpu \(1 image a call\); choose a smaller size",
        absent=["x.png"], setup=out_of_memory),
    row("seed-not-integer", GEN + " --seed 1.5 --out {tmp}/x.png", r"argument --seed: invalid int value: '1\.5'",
        absent=["x.png"]),
    row("seeds-not-integers", EVAL_RED + " --seeds 0,x --out {tmp}/o", r"argument --seeds: must be comma-separated integers .*got '0,x' \(see `trce eval --help`\)",
        absent=["o"]),
    row("n-zero", GEN + " --n 0 --out {tmp}/x.png", r"^--n must be at least 1, got 0", absent=["x.png"],
        setup=no_model_load),
    row("batch-size-zero", EVAL_RED + " --batch-size 0 --out {tmp}/o", r"^--batch-size must be at least 1, got 0",
        absent=["o"], setup=no_model_load),
    row("threshold-nan", EVAL_RED + " --detector nudenet --threshold nan --out {tmp}/o",
        r"^--threshold must be a finite number", absent=["o"], setup=no_model_load),
    row("config-seed-text", "erase --model {tiny} --config {tmp}/run.yaml --out {tmp}/p",
        r"^--seed must be an integer, got 'abc'", absent=["p"],
        setup=both(write("run.yaml", "concept: shapeworld-red\nstages: T\nseed: abc\n"), no_model_load)),
    # ---------------------------------------------------------------- concept specs
    row("spec-malformed-yaml", "erase --model {tiny} --concept {tmp}/s.yaml --out {tmp}/p",
        r"concept spec .*s\.yaml is not valid YAML", absent=["p"],
        setup=both(write("s.yaml", "name: [unclosed\n"), no_model_load)),
    row("spec-empty", "erase --model {tiny} --concept {tmp}/s.yaml --out {tmp}/p",
        r"concept spec .*s\.yaml is empty", absent=["p"], setup=both(write("s.yaml", ""), no_model_load)),
    row("spec-huge", "erase --model {tiny} --concept {tmp}/s.yaml --out {tmp}/p",
        r"concept spec .*s\.yaml is 2\.0 MB; a spec is at most 1 MB", absent=["p"],
        setup=both(write("s.yaml", SPEC.format(extra="# " + "x" * 2_000_000 + "\n")), no_model_load)),
    row("spec-not-utf8", "erase --model {tiny} --concept {tmp}/s.yaml --out {tmp}/p",
        r"concept spec .*s\.yaml is not UTF-8 text", absent=["p"],
        setup=both(write("s.yaml", SPEC.format(extra="description: caf\xe9\n").encode("latin-1")), no_model_load)),
    row("spec-is-a-folder", "erase --model {tiny} --concept {tmp}/s.yaml --out {tmp}/p",
        r"concept spec .*s\.yaml is a folder", absent=["p"], setup=both(folder("s.yaml"), no_model_load)),
    row("spec-unknown-field", "erase --model {tiny} --concept {tmp}/s.yaml --out {tmp}/p",
        r"field 'erase_words' is not a known field", absent=["p"],
        setup=both(write("s.yaml", SPEC.format(extra="erase_words: [x]\n")), no_model_load)),
    row("spec-wrong-type", "erase --model {tiny} --concept {tmp}/s.yaml --out {tmp}/p",
        r"field 'templates' must be a list", absent=["p"],
        setup=both(write("s.yaml", SPEC.format(extra="").replace("templates: ['{}']", "templates: 3")),
                   no_model_load)),
    row("config-not-utf8", "erase --model {tiny} --config {tmp}/run.yaml --out {tmp}/p",
        r"config file .*run\.yaml is not UTF-8 text", absent=["p"],
        setup=both(write("run.yaml", b"concept: caf\xe9\n"), no_model_load)),
    # ---------------------------------------------------------------- prompt files
    row("prompts-empty", EVAL + " --prompts {tmp}/p.csv --out {tmp}/o", r"prompt file .*p\.csv is empty",
        absent=["o"], setup=both(write("p.csv", ""), no_model_load)),
    row("prompts-no-column", EVAL + " --prompts {tmp}/p.csv --out {tmp}/o", r"has no column 'prompt'; its columns are 'text'",
        absent=["o"], setup=both(write("p.csv", "text\na red star\n"), no_model_load)),
    row("prompts-header-only", EVAL + " --prompts {tmp}/p.csv --out {tmp}/o", r"has a header but no rows",
        absent=["o"], setup=both(write("p.csv", "prompt\n"), no_model_load)),
    row("prompts-guidance-nan", EVAL + " --prompts {tmp}/p.csv --out {tmp}/o",
        r"row 2: column 'evaluation_guidance' should be a finite number >= 0, got 'nan'", absent=["o"],
        setup=both(write("p.csv", "prompt,evaluation_seed,evaluation_guidance\na red star,1,nan\n"), no_model_load)),
    row("prompts-seed-not-integer", EVAL + " --prompts {tmp}/p.csv --out {tmp}/o",
        r"row 2: column 'evaluation_seed' should be an integer, got '1\.5'", absent=["o"],
        setup=both(write("p.csv", "prompt,evaluation_seed\na red star,1.5\n"), no_model_load)),
    row("prompts-not-utf8", EVAL + " --prompts {tmp}/p.csv --out {tmp}/o", r"is not UTF-8 text", absent=["o"],
        setup=both(write("p.csv", b"prompt\ncaf\xe9\n"), no_model_load)),
    row("prompts-is-a-folder", EVAL + " --prompts {tmp}/p.csv --out {tmp}/o",
        r"^--prompts .*p\.csv is a folder, not a prompt file", absent=["o"],
        setup=both(folder("p.csv"), no_model_load)),
    row("prompts-missing", EVAL + " --prompts {tmp}/p.csv --out {tmp}/o", r"^--prompts .*p\.csv does not exist",
        absent=["o"], setup=no_model_load),
    row("prompts-bom", EVAL + " --prompts {tmp}/p.csv --out {tmp}/o", None,
        setup=write("p.csv", "\ufeffprompt\na red star\n"), check=prompt_is("o", "a red star")),
    row("prompts-quotes-newlines", EVAL + " --prompts {tmp}/p.csv --out {tmp}/o", None,
        setup=write("p.csv", 'prompt\n"a ""red"", star\non two lines"\n'),
        check=prompt_is("o", 'a "red", star\non two lines')),
    row("prompt-10000-chars", EVAL + " --prompts {tmp}/p.txt --out {tmp}/o", None, setup=write("p.txt", LONG + "\n"),
        check=both(prompt_is("o", LONG), logged(r"1 of 1 prompts? (is|are) longer than the model's 32 tokens and "
                                                 r"(is|are) truncated"))),
    row("prompt-emoji", EVAL + " --prompts {tmp}/p.txt --out {tmp}/o", None, setup=write("p.txt", "a red ⭐ 🟥\n"),
        check=prompt_is("o", "a red ⭐ 🟥")),
    row("prompt-script-in-report", "report {tmp}/o --out {tmp}/r.html", None,
        setup=both(write("p.txt", SCRIPT + "\n"), run_first(*(EVAL + " --prompts {tmp}/p.txt --out {tmp}/o").split())),
        check=report_escapes),
    # ---------------------------------------------------------------- patches
    row("patch-other-base", GEN + " --patch {other} --out {tmp}/x.png", r"made for base model .*fingerprint",
        absent=["x.png"]),
    row("patch-truncated", GEN + " --patch {tmp}/p --out {tmp}/x.png", r"corrupt or truncated", absent=["x.png"],
        setup=both(edit_weights(lambda d: (d[: len(d) // 2], False)), no_model_load)),
    row("patch-edited-tensor", GEN + " --patch {tmp}/p --out {tmp}/x.png", r"weights\.safetensors is corrupt.*checksum",
        absent=["x.png"], setup=both(edit_weights(flip_byte), no_model_load)),
    row("patch-pickle-as-safetensors", GEN + " --patch {tmp}/p --out {tmp}/x.png",
        r"corrupt or truncated safetensors file .*weights\.safetensors", absent=["x.png"],
        setup=both(edit_weights(pickled), no_model_load)),
    row("patch-base-wrong-type", GEN + " --patch {tmp}/p --out {tmp}/x.png",
        r"patch .*p: patch\.json field 'base' must be the base model's fingerprint", absent=["x.png"],
        setup=both(edit_patch_json(lambda m: m.update(base="sd14")), no_model_load)),
    row("patch-base-null", GEN + " --patch {tmp}/p --out {tmp}/x.png", None,
        setup=edit_patch_json(lambda m: m.update(base=None)),
        check=logged(r"patch .*p records no base model \(patch\.json base: null\): trce cannot check")),
    row("patch-files-a-list", GEN + " --patch {tmp}/p --out {tmp}/x.png",
        r"patch .*p: patch\.json field 'files' must be a mapping", absent=["x.png"],
        setup=both(edit_patch_json(lambda m: m.update(files=["weights.safetensors"])), no_model_load)),
    row("patch-json-a-list", GEN + " --patch {tmp}/p --out {tmp}/x.png",
        r"patch .*p: patch\.json must hold a mapping, got list", absent=["x.png"],
        setup=both(edit_patch_json(lambda m: []), no_model_load)),
    row("patch-tensors-wrong-type", GEN + " --patch {tmp}/p --out {tmp}/x.png",
        r"patch .*p: patch\.json field 'tensors' must be a mapping", absent=["x.png"],
        setup=both(edit_patch_json(lambda m: m.update(tensors="all")), no_model_load)),
    row("patch-is-a-file", GEN + " --patch {tmp}/p --out {tmp}/x.png", r"^--patch .*p is a file, not a patch folder",
        absent=["x.png"], setup=both(write("p", "x"), no_model_load)),
    row("patch-missing", GEN + " --patch {tmp}/p --out {tmp}/x.png", r"^--patch .*p does not exist",
        absent=["x.png"], setup=no_model_load),
    row("patch-folder-without-json", GEN + " --patch {tmp}/p --out {tmp}/x.png",
        r"^--patch .*p is not a trce patch folder \(no patch\.json\)", absent=["x.png"],
        setup=both(folder("p"), no_model_load)),
    # ---------------------------------------------------------------- output folders
    row("erase-out-is-a-file", ERASE + " --out {tmp}/f", r"^--out .*f is a file, not a folder",
        setup=both(write("f", "keep"), no_model_load), check=file_kept("f", "keep")),
    row("eval-out-is-a-file", EVAL_RED + " --out {tmp}/f", r"^--out .*f is a file, not a folder",
        setup=both(write("f", "keep"), no_model_load), check=file_kept("f", "keep")),
    row("out-parent-is-a-file", GEN + " --out {tmp}/f/x.png", r"^--out .*f/x\.png: .*f is a file, not a folder",
        setup=both(write("f", "keep"), no_model_load), check=file_kept("f", "keep")),
    row("eval-out-missing-parents", EVAL + " --prompts {tmp}/p.txt --out {tmp}/a/b/c", None,
        setup=write("p.txt", "a red star\n"), check=prompt_is("a/b/c", "a red star")),
    row("eval-out-read-only", EVAL_RED + " --out {tmp}/ro/o", r"^--out .*ro/o cannot be written",
        absent=["ro/o"], setup=both(read_only("ro"), no_model_load)),
    row("erase-out-read-only", ERASE + " --out {tmp}/ro/p", r"^--out .*ro/p cannot be written",
        absent=["ro/p"], setup=both(read_only("ro"), no_model_load)),
    row("erase-disk-full", ERASE + " --out {tmp}/disk/p", r"disk full while writing .*disk/p; free space",
        absent=["disk/p"], setup=full_disk("disk"), check=no_temporaries),
    row("eval-disk-full", EVAL + " --prompts {tmp}/p.txt --batch-size 1 --out {tmp}/disk/o",
        r"disk full while writing .*disk/o/.*; free space and rerun",
        setup=both(write("p.txt", "a red star\na blue star\na green star\na red circle\n"), full_disk("disk")),
        check=both(no_temporaries, complete_rows("disk/o"))),
    row("eval-out-other-settings", EVAL + " --prompts {tmp}/p.txt --steps 2 --out {tmp}/o",
        r"holds an evaluation made with other steps; use another --out",
        setup=both(write("p.txt", "a red star\n"), run_first(*(EVAL + " --prompts {tmp}/p.txt --out {tmp}/o").split())),
        check=unchanged_rows("o")),
    row("erase-out-other-settings", ERASE + " --eta 0.5 --out {tmp}/p", None,
        setup=run_first(*(ERASE + " --out {tmp}/p").split()), check=patch_loads(eta=0.5)),
    row("eval-out-in-use", EVAL + " --prompts {tmp}/p.txt --out {tmp}/o",
        r"^--out .*o is being written by another trce process \(pid 4242, trce eval, started .*\); wait",
        absent=["o"], setup=both(write("p.txt", "a red star\n"), hold_lock("o"), no_model_load)),
    row("erase-out-in-use", ERASE + " --out {tmp}/p", r"^--out .*p is being written by another trce process",
        absent=["p"], setup=both(hold_lock("p"), no_model_load)),
    row("train-out-in-use", "shapeworld train --tiny --out {tmp}/sw",
        r"^--out .*sw is being written by another trce process", absent=["sw"], setup=hold_lock("sw")),
    row("train-exclude-misspelt", "shapeworld train --tiny --out {tmp}/sw --exclude colour=red",
        r"^unknown ShapeWorld attribute 'colour' \(did you mean 'color'\?\)", absent=["sw/train.json"]),
    row("report-out-read-only", "report {tmp} --out {tmp}/ro/r.html", r"^--out .*ro/r\.html cannot be written",
        absent=["ro/r.html"], setup=read_only("ro")),
    row("stale-lock-of-a-killed-run", EVAL + " --prompts {tmp}/p.txt --out {tmp}/o", None,
        setup=both(write("p.txt", "a red star\n"), stale_lock("o")), check=prompt_is("o", "a red star")),
    # ---------------------------------------------------------------- environment
    row("cache-is-a-file", ERASE + " --out {tmp}/p", None,
        setup=both(write("cachefile", "x"), env("TRCE_CACHE", "{tmp}/cachefile")),
        check=both(logged(r"cache folder .*cachefile cannot be used .*; carrying on without a cache"),
                   lambda case: (case.tmp / "p" / "patch.json").exists() or pytest.fail("no patch"),
                   file_kept("cachefile", "x"))),
    row("cache-read-only", ERASE + " --out {tmp}/p", None,
        setup=both(read_only("rocache"), env("TRCE_CACHE", "{tmp}/rocache/trce")),
        check=both(logged(r"cache folder .*rocache/trce cannot be used .*; carrying on without a cache"),
                   lambda case: (case.tmp / "p" / "patch.json").exists() or pytest.fail("no patch"))),
    row("reference-cache-read-only", EVAL_RED + " --patch {patch} --reference-cache {tmp}/ro/cache --out {tmp}/o",
        None, setup=read_only("ro"),
        check=both(logged(r"reference cache .*ro/cache cannot be used .*; drawing the original model's images "
                          r"into .*o without it"),
                   lambda case: (case.tmp / "o" / "reference" / "rows.jsonl").exists() or pytest.fail("no ref"))),
    row("hub-id-offline", "info --model nobody/no-such-model", r"cannot load 'nobody/no-such-model' from the Hugging "
        r"Face hub.*pass a local diffusers folder", setup=env("HF_ENDPOINT", "http://127.0.0.1:9"), check=fast(10)),
]


def test_catalogue_is_large_and_distinct():
    assert len(ROWS) >= 40
    assert len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("case_row", ROWS, ids=[r.id for r in ROWS])
def test_hostile_input(case_row: Row, inputs, tmp_path, monkeypatch, caplog, capsys):
    from trce.cli import main

    caplog.set_level(logging.INFO, logger="trce")
    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))  # never the user's cache
    monkeypatch.delenv("TRCE_DATA", raising=False)
    case = Case(tmp_path, inputs, monkeypatch, caplog)
    if case_row.setup is not None:
        case_row.setup(case)
    fmt = _formatter(case)
    t0 = time.time()
    try:
        try:
            code = main([fmt(a) for a in case_row.args])
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
        captured = capsys.readouterr()
        case.out, case.err = captured.out, captured.err
        case.elapsed = time.time() - t0
        assert "Traceback" not in case.err, case.err
        if case_row.error is None:
            assert code == (case_row.code or 0), case.err
        else:
            assert code == (case_row.code or 2), case.err
            lines = [line for line in case.err.strip().splitlines() if line.startswith("trce: error: ")]
            assert len(lines) == 1 and case.err.strip().splitlines()[-1] == lines[0], case.err
            assert re.search(case_row.error, lines[0][len("trce: error: "):]), lines[0]
        for name in case_row.absent:
            assert not (tmp_path / name).exists(), f"{name} was left behind"
        left = [p for p in tmp_path.rglob(".*.lock") if p not in case.keep]
        assert not left, f"lock files left behind: {left}"
        if case_row.check is not None:
            monkeypatch.undo()  # the check reads files without the case's faults
            case_row.check(case)
    finally:
        for cleanup in case.cleanups:
            cleanup()


# --------------------------------------------------------------------------- two processes, a signal
PAUSE_AFTER_FIRST_BATCH = """
import sys
import trce.eval.rows as eval_rows  # generate_rows looks generate_iter up there
real = eval_rows.generate_iter
def paused(*args, **kwargs):
    for n, item in enumerate(real(*args, **kwargs)):
        yield item
        if n == 0:  # the first batch is on disk: hold the run here, as a long one would be, until told to go on
            print("paused", flush=True)
            sys.stdin.readline()
eval_rows.generate_iter = paused
from trce.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.heavy
def test_a_second_process_on_the_same_out_is_refused_and_sigterm_says_how_to_resume(run_cli, tiny_dir, tmp_path):
    """Two `trce eval` into one --out: the second is refused with one line naming the first, and the first's rows
    are untouched. SIGTERM ends the first like Ctrl-C: the resume hint, exit 143, whole rows only, no lock left; the
    rerun finishes with the images of an uninterrupted run."""
    from PIL import Image

    from trce.testing import assert_one_line_error

    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"a {c} {s}\n" for c in ("red", "blue", "green", "white") for s in
                               ("star", "circle", "square", "cross", "diamond")))
    args = ["eval", "--model", str(tiny_dir), "--prompts", str(prompts), "--detector", "none", "--steps", "2",
            "--batch-size", "4", "--no-progress", "--device", "cpu", "--out"]
    script = tmp_path / "paused.py"
    script.write_text(PAUSE_AFTER_FIRST_BATCH)
    out = tmp_path / "o"
    env = {**os.environ, "TRCE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, str(script), *args, str(out)], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if first.stdout.readline().strip() != "paused":  # blocks until the first batch is on disk (no polling)
            pytest.fail(f"the first run never reached its first batch: {first.communicate()[1]}")
        rows_before = (out / "rows.jsonl").read_text()
        assert len(rows_before.splitlines()) == 4
        code, _, err = run_cli(*args, out)
        assert_one_line_error(code, err, f"--out {out} is being written by another trce process (pid {first.pid}")
        assert (out / "rows.jsonl").read_text() == rows_before
        first.send_signal(signal.SIGTERM)
        _, first_err = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 128 + signal.SIGTERM, first_err
    assert "trce: terminated (SIGTERM); finished work is kept: rerun the same command to resume" in first_err
    assert "Traceback" not in first_err
    assert not list(tmp_path.glob(".*.lock"))
    assert all(json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines())
    code, _, err = run_cli(*args, out)  # the rerun resumes
    assert code == 0, err
    code, _, err = run_cli(*args, tmp_path / "whole")  # an uninterrupted run
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "whole" / "images").iterdir())
    assert len(names) == 20 and names == sorted(p.name for p in (out / "images").iterdir())
    for name in names:
        assert np.array_equal(np.asarray(Image.open(out / "images" / name)),
                              np.asarray(Image.open(tmp_path / "whole" / "images" / name))), name


# --------------------------------------------------------------------------- what the code promises
def test_an_image_does_not_depend_on_its_batch():
    """generate.py's promise: an image depends on model, prompt, seed, guidance, steps and size only. On ShapeWorld
    --batch-size 100 and 8 gave images one grey level apart; neighbours and order must not matter either."""
    from trce.generate import GenSettings, generate
    from trce.loading import load_pipeline

    pipe = load_pipeline("shapeworld")
    prompts = [f"a {c} {s} on a {b} background" for c in ("red", "blue", "green") for s in ("star", "circle", "cross")
               for b in ("black", "white")]
    seeds = list(range(len(prompts)))

    def draw(batch_size: int, order=None) -> np.ndarray:
        order = list(range(len(prompts))) if order is None else order
        images = generate(pipe, [prompts[i] for i in order], [seeds[i] for i in order],
                          GenSettings(steps=3, batch_size=batch_size), progress=False)
        out = np.zeros((len(prompts), *images.shape[1:]), np.uint8)
        out[order] = images
        return out, order

    reference, _ = draw(100)
    for batch_size, order in ((8, None), (1, None), (5, list(range(len(prompts)))[::-1]), (3, [7, 2, 11])):
        images, order = draw(batch_size, order)
        assert np.array_equal(images[order], reference[order]), (batch_size, order)


def test_outputs_get_the_usual_permissions(run_cli, tiny_dir, tmp_path, monkeypatch):
    """Every file trce writes is 0666 less the umask (patch weights were 0600, patch.json 0644)."""
    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    old = os.umask(0o022)
    try:
        assert run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--stages", "T",
                       "--out", tmp_path / "p")[0] == 0
        (tmp_path / "p.txt").write_text("a red star\n")
        assert run_cli("eval", "--model", tiny_dir, "--prompts", tmp_path / "p.txt", "--detector", "none", "--steps",
                       "1", "--no-progress", "--out", tmp_path / "o")[0] == 0
        assert run_cli("generate", "--model", tiny_dir, "--prompt", "x", "--steps", "1", "--out",
                       tmp_path / "x.png")[0] == 0
    finally:
        os.umask(old)
    files = [*(tmp_path / "p").iterdir(), *(tmp_path / "o").rglob("*.*"), tmp_path / "x.png", tmp_path / "x.json"]
    modes = {str(f.relative_to(tmp_path)): oct(f.stat().st_mode & 0o777) for f in files if f.is_file()}
    assert "p/weights.safetensors" in modes and "o/images/00000.png" in modes
    assert set(modes.values()) == {"0o644"}, modes
