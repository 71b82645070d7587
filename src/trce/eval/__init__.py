"""Evaluation: prompt suites as data, detectors, metrics, and generation at scale (`trce eval`).

- `trce.eval.prompts`: `load_prompts(path)` reads every public benchmark layout into `PromptRow`s.
- `trce.eval.suites`: `load_suite(name)`, `list_suites()`; built-in suites are YAML in `suites/`.
- `trce.eval.detectors`: `make_detector(name, threshold, ...)` (nudenet, shapeworld, q16, none).
- `trce.eval.metrics`: Wilson intervals, the Fréchet distance, CLIP score, ESR/PSR.
- `trce.eval.runner`: `run_eval(EvalConfig(...), out)` -> metrics.json.
"""

from __future__ import annotations

__all__ = ["EvalConfig", "load_prompts", "load_suite", "make_detector", "run_eval"]


def __getattr__(name: str):
    # Lazy, so importing one submodule does not pull in torch and diffusers.
    if name == "EvalConfig":
        from trce.eval.options import EvalConfig

        return EvalConfig
    if name == "run_eval":
        from trce.eval.runner import run_eval

        return run_eval
    if name == "load_prompts":
        from trce.eval.prompts import load_prompts

        return load_prompts
    if name == "load_suite":
        from trce.eval.suites import load_suite

        return load_suite
    if name == "make_detector":
        from trce.eval.detectors import make_detector

        return make_detector
    raise AttributeError(name)
