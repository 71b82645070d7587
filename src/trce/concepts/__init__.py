"""Concept specs: what an erasure removes, what it maps it to, and what it keeps (data, not code).

`load_spec("sexual")` (a built-in by name or alias) or `load_spec("my.yaml")`; `builtin_specs()`
lists the built-ins shipped in `builtin/`. See `trce.concepts.parse` for the YAML format.

Modules, bottom up: `model` (Expression, Preservation, Pair, fill), `sources` (preservation prompts), `shapeworld`
(ShapeWorld pairs and captions), `spec` (ConceptSpec), `reader` (YAML files, typed fields), `extends`, `parse`
(the YAML format, validated), `load` (built-ins by name, files by path).
"""

from __future__ import annotations

from trce.concepts.load import builtin_specs, concept_yaml, load_spec
from trce.concepts.model import Expression, Pair, Preservation, fill
from trce.concepts.parse import spec_from_dict
from trce.concepts.reader import builtin_dir
from trce.concepts.sources import read_prompt_file
from trce.concepts.spec import (
    ConceptSpec,
    as_specs,
    other_concept_prompts,
    preservation_prompts,
    preservation_prompts_of,
    spec_record,
)

__all__ = [
    "ConceptSpec",
    "Expression",
    "Pair",
    "Preservation",
    "as_specs",
    "builtin_dir",
    "builtin_specs",
    "concept_yaml",
    "fill",
    "load_spec",
    "other_concept_prompts",
    "preservation_prompts",
    "preservation_prompts_of",
    "read_prompt_file",
    "spec_from_dict",
    "spec_record",
]


def _names() -> list[str]:
    """Names of the built-in concept specs (`trce.load_concept(name)` reads one; a YAML path works too)."""
    return list(builtin_specs())


from trce.utils import callable_module

callable_module(__name__, _names)  # `trce.concepts()`
