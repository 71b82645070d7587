"""trce: reliable concept erasure for text-to-image diffusion models.

    import trce

    pipe = trce.load_pipeline("shapeworld")                       # any diffusers SD pipeline: a folder or a hub id
    edit = trce.erase(pipe, "shapeworld-red")                      # TRCE (stage T, then V) -> an Edit
    metrics = trce.evaluate(pipe, "shapeworld-red", edit=edit, limit=20, out="runs/eval-red")
    edit.save("runs/red")                                          # a patch folder; trce.load_patch reads it back
    trce.attack(pipe, "shapeworld-red", "ring-a-bell", edit=edit, limit=5, out="runs/attack")
    trce.report(["runs/eval-red", "runs/attack"], "report.html")

Everything the `trce` command line does is one of these calls. Lists of what exists: `trce.concepts()`,
`trce.suites()`, `trce.methods()`, `trce.attacks()`, `trce.families()`.
"""

from __future__ import annotations

from trce.version import __version__

# name -> "module:attribute"; imported on first use, so `import trce` stays cheap (no torch at startup).
_API = {
    "TrceError": "trce.errors:TrceError",
    "Edit": "trce.edit:Edit",
    "load_pipeline": "trce.loading:load_pipeline",
    "load_patch": "trce.edit:load_patch",
    "load_concept": "trce.concepts:load_spec",
    "erase": "trce.methods:erase",
    "evaluate": "trce.eval.runner:evaluate",
    "attack": "trce.attacks.run:attack",
    "generate_images": "trce.generate:generate_images",
    "export": "trce.edit:export",
    "applied_edits": "trce.edit:applied_edits",
    "family_of": "trce.families:family_of",
}

__all__ = ["Edit", "TrceError", "__version__", "applied_edits", "attack", "attacks", "concepts", "erase", "evaluate",
           "export", "families", "family_of", "generate_images", "load_concept", "load_patch", "load_pipeline",
           "methods", "report", "suites"]


def suites() -> list[str]:
    """Names of the built-in evaluation suites (real benchmarks and ShapeWorld concepts)."""
    from trce.eval.suites import builtin_suites

    return list(builtin_suites())


# Subpackages that are also calls: `trce.concepts()`, `trce.methods()`, `trce.attacks()`, `trce.families()` list
# names, `trce.report(runs, out)` writes a report (see `trce.utils.callable_module`).
_CALLABLE_PACKAGES = ("concepts", "methods", "attacks", "families", "report")


def __getattr__(name: str):
    import importlib

    if name in _API:
        module, _, attribute = _API[name].partition(":")
        return getattr(importlib.import_module(module), attribute)
    if name in _CALLABLE_PACKAGES:
        return importlib.import_module(f"trce.{name}")
    raise AttributeError(f"module 'trce' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API) | set(_CALLABLE_PACKAGES))
