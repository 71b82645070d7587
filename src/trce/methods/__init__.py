"""Erasing concepts: `erase(pipe, concept, method, stages, **settings) -> Edit`, over the method registry.

    edit = trce.erase(pipe, "shapeworld-red")                                   # TRCE, stages T then V
    edit = trce.erase(pipe, "shapeworld-red", method="kpop", kpop={"iterations": 50})
    edit = trce.erase(pipe, ["shapeworld-red", "shapeworld-star"], stages="T", T={"eta": 0.01})

Settings are given per stage, by stage name (`T`, `V`, `kpop`, `esd`: see `trce.methods()` and
`trce.registry`), as mappings. Each stage's config is built from the concept spec's recommended
`settings:` (each spec of a list in turn), then the caller's mapping on top; unknown stage names and
unknown setting names are refused by name. `plan(...)` resolves all of that without running
anything (the demo keys its reuse of patches on it; `trce erase` records it).

A multi-stage method runs its stages in order, each on the model edited by the ones before (TRCE's
stage V trains the visual layers of the stage-T model, with targets from a frozen copy of the
original denoiser), and returns one Edit whose base is the fingerprint of the unedited model. The
pipeline is left as it was.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trce.errors import TrceError, check_seed
from trce.registry import Context, Method, get_method, make_config

log = logging.getLogger(__name__)

__all__ = ["Plan", "erase", "plan", "resolve_concepts", "run"]


def resolve_concepts(concept) -> list:
    """A name, alias, spec path, `ConceptSpec`, or a list of them (names may be comma-separated) -> specs."""
    from trce.concepts import ConceptSpec, load_spec

    if isinstance(concept, (str, os.PathLike, ConceptSpec)):
        items = [concept]
    elif concept is None or (isinstance(concept, Iterable) and not isinstance(concept, (bytes, Mapping))):
        items = list(concept or [])
    else:
        raise TrceError(f"concept must be a name, a spec path, a ConceptSpec or a list of them, got "
                        f"{type(concept).__name__} {concept!r}", field="concept")
    specs = []
    for item in items:
        if isinstance(item, ConceptSpec):
            specs.append(item)
            continue
        if not isinstance(item, (str, os.PathLike)):
            raise TrceError(f"a concept is a name, a spec path or a ConceptSpec, got {type(item).__name__} {item!r}")
        text = str(item)
        names = [text] if Path(text).expanduser().exists() else [x.strip() for x in text.split(",") if x.strip()]
        specs.extend(load_spec(n) for n in names)
    if not specs:
        raise TrceError("no concept given: name a built-in concept (see `trce concepts`) or a spec YAML path")
    return specs


@dataclass(frozen=True)
class Plan:
    """Everything an erasure depends on, resolved: the method, its stages, the specs and each stage's config."""

    method: Method
    stages: tuple[str, ...]
    specs: tuple
    configs: Mapping[str, Any]
    context: Context
    family: str | None = None  # the model family whose `family_settings` the configs took (None: none)
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # the caller's settings per stage

    def for_family(self, family: str) -> Plan:
        """The same plan with the specs' `family_settings` of `family` merged in (the caller's settings still win)
        and their `family_targets` of `family` as the safe texts."""
        if family == self.family:
            return self
        configs = _configs(self.stages, self.specs, family, self.overrides, self.context.seed)
        specs = tuple(s.for_family(family) for s in self.specs)
        return dataclasses.replace(self, specs=specs, configs=configs, family=family)

    def record(self) -> dict:
        """A JSON-able record: what `trce erase` writes into the patch's run record."""
        return {"method": self.method.name, "stages": list(self.stages), "concepts": [s.name for s in self.specs],
                "settings": {k: dataclasses.asdict(v) for k, v in self.configs.items()}, "seed": self.context.seed,
                **({"family": self.family} if self.family else {})}

    def key(self, base_id: str | None = None) -> str:
        """A digest of everything the resulting Edit depends on (with the base model's fingerprint id)."""
        payload = {"record": self.record(), "specs": [dataclasses.asdict(s) for s in self.specs], "base": base_id}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def plan(concept, method: str = "trce", stages: str | Sequence[str] | None = None, *, seed: int = 0,
         data: str | Path | None = None, cache: str | Path | None = None, use_cache: bool = True,
         progress: bool = True, checkpoint_dir: str | Path | None = None, family: str | None = None,
         **settings: Mapping[str, Any] | None) -> Plan:
    """Resolve an erasure without running it (the arguments of `erase`; `family`: the model family whose
    `family_settings` the specs apply, which `run` fills in from the pipeline when left out)."""
    m = get_method(method)
    if isinstance(stages, Iterable) and not isinstance(stages, (str, bytes, Mapping)):
        stages = list(stages)
    if not (stages is None or isinstance(stages, str) or (isinstance(stages, list)
                                                          and all(isinstance(s, str) for s in stages))):
        raise TrceError(f"stages must be stage names of method {m.name!r} ({', '.join(m.stage_names)}) as 'T,V' or "
                        f"a list, got {stages!r}", field="stages")
    chosen = m.parse_stages(stages)
    for section, values in settings.items():
        if section not in m.stage_names:
            raise TrceError(f"method {m.name!r} has no stage {section!r} to take settings; "
                            f"its stages: {', '.join(m.stage_names)}")
        if values is not None and not isinstance(values, Mapping):
            raise TrceError(f"settings of stage {section} must be a mapping such as {{'lr': 1e-4}}, got {values!r}")
    check_seed(seed, "seed")
    specs = [s.for_family(family) for s in resolve_concepts(concept)]
    overrides = _hardened(m, {k: dict(v) for k, v in settings.items() if v})
    configs = _configs(chosen, specs, family, overrides, seed)
    if use_cache:
        use_cache = _cache_usable(cache)
    context = Context(seed=seed, data_dir=data, cache_dir=cache, use_cache=use_cache, progress=progress,
                      checkpoint_dir=checkpoint_dir)
    return Plan(method=m, stages=chosen, specs=tuple(specs), configs=configs, context=context, family=family,
                overrides=overrides)


def _hardened(m: Method, overrides: dict) -> dict:
    """The caller's `robust: R` of the closed-form stage (`--robust R`) hardens the method's other stages that take
    `robust` too (TRCE's V), unless the caller set theirs."""
    closed = next((s for s in ("T", "rece") if s in m.stage_names), None)
    rounds = (overrides.get(closed) or {}).get("robust") if closed else None
    if rounds is None:
        return overrides
    for stage in m.stages:
        if stage.name != closed and "robust" in {f.name for f in dataclasses.fields(stage.config_class())}:
            overrides.setdefault(stage.name, {}).setdefault("robust", rounds)
    return overrides


def _configs(stages, specs, family: str | None, overrides: Mapping, seed: int) -> dict:
    """Each stage's config: the specs' `settings`, then their `family_settings[family]`, then the caller's. A later
    layer that sets one of a config's alternative settings (its `ALTERNATIVES`, e.g. KPOP's prompt_size or
    prompt_tokens) replaces the other ones an earlier layer set."""
    from trce.registry import sections

    configs = {}
    for stage in stages:
        alternatives = getattr(sections()[stage].config_class(), "ALTERNATIVES", ())
        merged: dict[str, Any] = {}
        layers = [s.settings.get(stage, {}) for s in specs]
        layers += [s.family_settings.get(family, {}).get(stage, {}) for s in specs] if family else []
        layers.append(overrides.get(stage) or {})
        for values in layers:
            for group in alternatives:
                if any(k in values for k in group):
                    for k in group:
                        merged.pop(k, None)
            merged.update(values)
        configs[stage] = make_config(stage, merged, seed=seed)
    return configs


def _cache_usable(cache: str | Path | None) -> bool:
    """Whether the cache folder can be written, found out before any work; one that cannot (a read-only place, a
    file in the way) is left out with one log line, and the erasure runs without a cache."""
    from trce.methods.prior import cache_dir
    from trce.utils import io

    folder = cache_dir(cache)
    problem = io.usable_folder(folder)
    if problem is None:
        return True
    log.warning("cache folder %s cannot be used (%s); carrying on without a cache: nothing is reused or "
                "checkpointed (set TRCE_CACHE or the cache folder to a writable place)", folder, problem)
    return False


def erase(pipe, concept, method: str = "trce", stages: str | Sequence[str] | None = None, *, seed: int = 0,
          data: str | Path | None = None, cache: str | Path | None = None, use_cache: bool = True,
          progress: bool = True, checkpoint_dir: str | Path | None = None, robust: int | None = None,
          **settings: Mapping[str, Any] | None):
    """Erase `concept` from `pipe` with `method`; returns the `Edit` (the pipeline is left unchanged).

    concept   a built-in concept name or alias, a spec YAML path, a `ConceptSpec`, or a list of them
              (erased together: one solve, one training run)
    method    see `trce.methods()`; stages: a subset of the method's (default: its default stages)
    seed      the run's seed; data: the data folder (COCO captions); cache: priors, trajectories and
              checkpoints (default $TRCE_CACHE or ~/.cache/trce); use_cache=False computes everything
    settings  per stage, by name: `T={"eta": 0.01}`, `V={"epochs": 1}`, `kpop={"iterations": 50}`
    robust    hardening rounds of the closed-form stage (`T`, or RECE's): shorthand for `T={"robust": R}`, which
              also hardens TRCE's stage V (`V={"robust": R}`) unless V's own is given
    """
    if robust is not None:
        stage = robust_stage(method)
        settings[stage] = {**(settings.get(stage) or {}), "robust": robust}
    from trce.families import family_of

    the_plan = plan(concept, method, stages, seed=seed, data=data, cache=cache, use_cache=use_cache,
                    progress=progress, checkpoint_dir=checkpoint_dir, family=family_of(pipe).name, **settings)
    not_run = sorted(s for s, v in settings.items() if v and s not in the_plan.stages)
    if not_run:  # settings of a stage this run skips would be ignored without a word
        raise TrceError(f"{not_run[0]}= sets stage {not_run[0]}, which this run does not run (stages "
                        f"{','.join(the_plan.stages)}); drop it or add the stage to stages=", field="stages")
    return run(pipe, the_plan)


def robust_stage(method: str) -> str:
    """The stage whose `robust` setting hardens `method` (TRCE's and UCE's T, RECE's rece)."""
    from trce.registry import get_method

    m = get_method(method)
    for stage in m.stage_names:
        if stage in ("T", "rece"):
            return stage
    raise TrceError(f"robust= hardens a closed-form stage (T); method {m.name!r} has none "
                    f"(its stages: {', '.join(m.stage_names)})", field="robust")


def run(pipe, plan: Plan):
    """Run a `Plan` on `pipe`: one Edit (see the module doc)."""
    from trce.edit import Edit, fingerprint
    from trce.families import family_of

    plan = plan.for_family(family_of(pipe).name)  # a no-op when the plan was made for this family
    m = plan.method
    functions = {s: m.stage(s).function(m.name) for s in plan.stages}  # fail before any work when one is missing
    specs = list(plan.specs)
    if len(plan.stages) == 1:
        stage = plan.stages[0]
        return functions[stage](pipe, specs, plan.configs[stage], plan.context)
    base = fingerprint(pipe)
    # Later stages take their targets from the ORIGINAL model (TRCE stage V, Eq. 6-7): keep a copy.
    reference = copy.deepcopy(family_of(pipe).denoiser(pipe)).requires_grad_(False)
    done: list[tuple[str, Edit]] = []
    try:
        for i, stage in enumerate(plan.stages):
            context = dataclasses.replace(plan.context, reference=reference) if i else plan.context
            edit = functions[stage](pipe, specs, plan.configs[stage], context)
            edit.apply(pipe, check_base=False)
            done.append((stage, edit))
    finally:
        for _, edit in reversed(done):
            edit.revert(pipe)
        del reference
    weights: dict = {}
    extras: dict = {}
    for _, edit in done:
        weights.update(edit.weights)
        extras.update(edit.extras)
    return Edit(weights=weights, method=m.name, spec=done[-1][1].spec, base=base, extras=extras,
                settings={"stages": list(plan.stages), **{s: e.settings for s, e in done}},
                info={s: e.info for s, e in done})


def _names() -> list[str]:
    """Names of the erasure methods in the registry (`trce.registry.get_method(name)` describes one)."""
    from trce.registry import method_names

    return method_names()


from trce.utils import callable_module

callable_module(__name__, _names)  # `trce.methods()`
