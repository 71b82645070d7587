"""Reading a spec's YAML: one file's parsed text (`read_yaml`), the built-in specs' folder and their name index, and
typed access to the parsed mapping (`Reader`, whose errors name the field and the file)."""

from __future__ import annotations

import difflib
import functools
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from trce.errors import TrceError

TOP_KEYS = ("name", "aliases", "description", "erase", "templates", "preserve", "eta", "ridge", "token_role",
            "attribute", "value", "values", "contexts", "open", "seed", "settings", "family_settings", "extends")
MAX_SPEC_BYTES = 1 << 20  # a spec names prompts and settings; long prompt lists go in a prompt file it names


def builtin_dir() -> Path:
    return Path(str(resources.files("trce.concepts").joinpath("builtin")))


@functools.cache
def builtin_files() -> dict[str, Path]:
    """{name or alias: file} of the built-in specs, from their `name` and `aliases` fields only (once a process: the
    package's files do not change while it runs)."""
    index: dict[str, Path] = {}
    for file in sorted(builtin_dir().glob("*.yaml")):
        head = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        for name in [head.get("name"), *(head.get("aliases") or [])]:
            if isinstance(name, str):
                index.setdefault(name, file.resolve())
    return index


def read_yaml(path: Path) -> Any:
    """The parsed YAML of spec file `path` (a spec, or a base that `extends:` names): a missing, oversized,
    non-UTF-8, invalid or empty file is one error."""
    if not path.exists():
        raise TrceError(f"concept spec file {path} does not exist")
    if path.is_dir():
        raise TrceError(f"concept spec {path} is a folder; give a spec YAML file")
    size = path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise TrceError(f"concept spec {path} is {size / 1e6:.1f} MB; a spec is at most {MAX_SPEC_BYTES >> 20} MB "
                        "(put long prompt lists in a file it names: preserve: {file: ...})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TrceError(f"concept spec {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise TrceError(f"cannot read concept spec {path}: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TrceError(f"concept spec {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if raw is None:
        raise TrceError(f"concept spec {path} is empty; a spec needs at least name, erase and templates")
    return raw


class Reader:
    """Typed access to a YAML mapping; every error names the field and the file."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, problem: str) -> TrceError:
        return TrceError(f"concept spec {self.where}: field {key!r} {problem}")

    def string(self, raw: Any, key: str, allow_empty: bool = False) -> str:
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            raise self.fail(key, f"must be a string, got {type(raw).__name__} {raw!r}")
        text = str(raw).strip()
        if not text and not allow_empty:
            raise self.fail(key, "must not be empty")
        return text

    def strings(self, raw: Any, key: str) -> tuple[str, ...]:
        if raw is None:
            return ()
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list):
            raise self.fail(key, f"must be a list of strings, got {type(raw).__name__}")
        return tuple(self.string(x, f"{key}[{i}]") for i, x in enumerate(raw))

    def number(self, raw: Any, key: str, low: float = 0.0) -> float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise self.fail(key, f"must be a number, got {raw!r}")
        if raw < low:
            raise self.fail(key, f"must be at least {low}, got {raw}")
        return float(raw)

    def integer(self, raw: Any, key: str, low: int = 0) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise self.fail(key, f"must be an integer, got {raw!r}")
        if raw < low:
            raise self.fail(key, f"must be at least {low}, got {raw}")
        return int(raw)

    def mapping(self, raw: Any, key: str, allowed: tuple[str, ...]) -> dict:
        if not isinstance(raw, dict):
            raise self.fail(key, f"must be a mapping, got {type(raw).__name__}")
        for k in raw:
            if k not in allowed:
                close = difflib.get_close_matches(str(k), allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.fail(f"{key}.{k}" if key else str(k),
                                f"is not a known field{hint}; known: {', '.join(allowed)}")
        return raw
