"""The spec registry: the built-in specs (`builtin/*.yaml`) by name or alias, and spec YAML files by path."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from trce.concepts.parse import spec_from_dict
from trce.concepts.reader import builtin_dir, read_yaml
from trce.concepts.spec import ConceptSpec
from trce.errors import TrceError, choose


def read_spec_file(path: str | Path) -> ConceptSpec:
    path = Path(path).expanduser()
    return spec_from_dict(read_yaml(path), where=str(path), base_dir=path.parent)


def builtin_specs() -> dict[str, ConceptSpec]:
    """Built-in specs by name (in name order)."""
    specs = [read_spec_file(p) for p in sorted(builtin_dir().glob("*.yaml"))]
    return {s.name: s for s in sorted(specs, key=lambda s: s.name)}


def load_spec(name_or_path: str | Path) -> ConceptSpec:
    """A built-in spec by name or alias, or a spec YAML file by path."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or os.sep in text:
        return read_spec_file(text)
    specs = builtin_specs()
    aliases = {alias: s for s in specs.values() for alias in s.aliases}
    if text in specs:
        return specs[text]
    if text in aliases:
        return aliases[text]
    if Path(text).is_file():
        return read_spec_file(text)
    close = difflib.get_close_matches(text, [*specs, *aliases], n=1)
    if close and close[0] in aliases:  # a typo of an alias ("nudty"): suggest the alias, list the names
        raise TrceError(f"unknown concept {text!r} (did you mean {close[0]!r}?); available: {', '.join(sorted(specs))}")
    return specs[choose("concept", text, specs)]


def concept_yaml(name_or_path: str | Path) -> str:
    """The YAML text of a spec (built-in name, alias or path)."""
    spec = load_spec(name_or_path)
    return Path(spec.source or "").read_text(encoding="utf-8")
