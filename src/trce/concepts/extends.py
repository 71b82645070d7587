"""`extends:`: a spec on top of its base's fields (see `trce.concepts.parse` for the rules), resolved recursively."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trce.concepts.reader import TOP_KEYS, Reader, builtin_files, read_yaml
from trce.errors import TrceError, choose

NOT_INHERITED = ("name", "aliases", "description")  # what an `extends:` spec never takes from its base
MERGED = ("settings", "family_settings")  # merged key by key (at every depth) with the base's; the rest replaces


def extended(r: Reader, raw: dict, base_dir: Path | None, chain: tuple[Path, ...]) -> dict:
    """`raw` (which has `extends:`) on top of its base's fields, resolved recursively (`chain`: the files already on
    the way, a cycle's guard)."""
    ref = r.string(raw["extends"], "extends")
    path = base_path(r, ref, base_dir)
    if path in chain:
        loop = " -> ".join(str(p) for p in (*chain, path))
        raise r.fail("extends", f"makes a cycle: {loop}")
    base_reader = Reader(str(path))
    base = base_reader.mapping(read_yaml(path), "", TOP_KEYS)
    if "extends" in base:
        base = extended(base_reader, base, path.parent, (*chain, path))
    base = dict(base)
    preserve = base.get("preserve")
    if isinstance(preserve, dict) and isinstance(preserve.get("file"), str):  # the base's file, from the base's folder
        file = Path(preserve["file"]).expanduser()
        if not file.is_absolute() and (path.parent / file).exists():
            base["preserve"] = {**preserve, "file": str(path.parent / file)}
    out = {k: v for k, v in base.items() if k not in NOT_INHERITED}
    for one, other in (("value", "values"), ("values", "value")):  # either names the ShapeWorld value(s)
        if one in raw:
            out.pop(other, None)
    for key, value in raw.items():
        if key != "extends":
            out[key] = merge(out[key], value) if key in MERGED and key in out else value
    return out


def merge(base: Any, over: Any) -> Any:
    """`over` on top of `base`: mappings key by key at every depth, anything else replaced."""
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return over
    return {**base, **{k: merge(base[k], v) if k in base else v for k, v in over.items()}}


def base_path(r: Reader, ref: str, base_dir: Path | None) -> Path:
    """The YAML file that `extends: ref` names: a path (relative to the extending spec's folder) or a built-in's name
    or alias (read without building every built-in, so that a built-in may extend another)."""
    if ref.endswith((".yaml", ".yml")) or os.sep in ref:
        path = Path(ref).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise r.fail("extends", f"names {ref!r}, and {path} is not a file")
        return path.resolve()
    index = builtin_files()
    try:
        return index[choose("concept", ref, index)]
    except TrceError as exc:
        raise r.fail("extends", str(exc)) from None
