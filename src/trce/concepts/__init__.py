"""Concept specs: what an erasure removes, what it maps it to, and what it keeps (data, not code).

`load_spec("sexual")` (a built-in by name or alias) or `load_spec("my.yaml")`; `builtin_specs()`
lists the built-ins shipped in `builtin/`. See `trce.concepts.spec` for the YAML format.
"""

from __future__ import annotations

from trce.concepts.spec import (
    ConceptSpec,
    Expression,
    Pair,
    Preservation,
    as_specs,
    builtin_dir,
    builtin_specs,
    concept_yaml,
    fill,
    load_spec,
    other_concept_prompts,
    preservation_prompts,
    preservation_prompts_of,
    read_prompt_file,
    spec_from_dict,
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
