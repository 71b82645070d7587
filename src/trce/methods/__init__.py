"""Erasure methods by name: `get_method(name)` and `erase(pipe, spec, method, stages, configs)`.

Each method is a list of stages; each stage is one plain function `f(pipe, spec, config) -> Edit`
in its own module, named here as "module:function" so that importing the registry imports no
method. A multi-stage method runs its stages in order, each on the model edited by the ones
before (TRCE's stage V trains the visual layers of the stage-T model), and returns one Edit whose
base is the fingerprint of the unedited model. New methods plug in by adding an entry.
"""

from __future__ import annotations

import copy
import importlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trce.errors import TrceError, choose

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    stages: Mapping[str, str]  # stage name -> "module:function", in the order they run
    default_stages: tuple[str, ...]

    def stage_function(self, stage: str):
        module_name, _, function = self.stages[stage].partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            raise TrceError(f"stage {stage} is not available yet in method {self.name!r} "
                            f"(use --stages {','.join(self.default_stages)})") from exc
        if not hasattr(module, function):
            raise TrceError(f"stage {stage} is not available yet in method {self.name!r} ({module_name} has no "
                            f"{function}); use --stages {','.join(self.default_stages)}")
        return getattr(module, function)


METHODS: dict[str, Method] = {
    "trce": Method(
        name="trce",
        description="TRCE (Chen et al. 2025): T = closed-form [EoT] edit of cross-attention K/V (Eq. 5); "
                    "V = denoising-trajectory steering of the visual layers (Eq. 6-9)",
        stages={"T": "trce.methods.stage_t:erase", "V": "trce.methods:erase_stage_v"},
        default_stages=("T", "V"),  # the paper's TRCE; --stages T for the closed-form edit alone
    ),
    "kpop": Method(
        name="kpop",
        description="KPOP: a learnable prompt in cross-attention absorbs the concept while the model forgets it "
                    "(alternating knowledge transfer and removal, Eq. 5-7); the prompt ships in the patch",
        stages={"kpop": "trce.methods:erase_kpop_spec"},
        default_stages=("kpop",),
    ),
    "esd": Method(
        name="esd",
        description="ESD baseline (Gandikota et al. 2023): fine-tune the UNet to predict the negatively guided "
                    "neutral noise on the erase prompts; params cross-attn = ESD-x, non-cross-attn = ESD-u",
        stages={"esd": "trce.methods:erase_esd_spec"},
        default_stages=("esd",),
    ),
    "uce": Method(
        name="uce",
        description="UCE-style baseline: the same closed-form edit on the keyword tokens (token role 'key')",
        stages={"T": "trce.methods.stage_t:erase_uce"},
        default_stages=("T",),
    ),
}


def get_method(name: str) -> Method:
    return METHODS[choose("method", name, METHODS)]


def parse_stages(method: Method, stages: str | Sequence[str] | None) -> tuple[str, ...]:
    """"T", "V", "T,V" or a sequence -> stage names in the method's order, validated."""
    if stages is None:
        return method.default_stages
    items = [s.strip() for s in (stages.split(",") if isinstance(stages, str) else stages)]
    if not items or any(not s for s in items):
        raise TrceError(f"bad --stages {stages!r}; use a comma-separated list of {', '.join(method.stages)}")
    for s in items:
        if s not in method.stages:
            raise TrceError(f"method {method.name!r} has no stage {s!r}; its stages: {', '.join(method.stages)}")
    return tuple(s for s in method.stages if s in items)


def erase(pipe, spec, method: str = "trce", stages: str | Sequence[str] | None = None,
          configs: Mapping[str, Any] | None = None, options: Mapping[str, Mapping[str, Any]] | None = None):
    """Run `method`'s `stages` on `pipe` for `spec` (a ConceptSpec or a list): one Edit.

    `configs` maps stage name -> that stage's config object (absent: the stage's default);
    `options` maps stage name -> extra keyword arguments of that stage's function (for instance
    `{"V": {"cache_dir": ...}}`). The pipeline is left as it was: intermediate edits are reverted.
    """
    from trce.edit import Edit
    from trce.loading import fingerprint

    m = get_method(method)
    chosen = parse_stages(m, stages)
    functions = {s: m.stage_function(s) for s in chosen}  # fail before any work when a stage is missing
    configs = dict(configs or {})
    options = {s: dict((options or {}).get(s, {})) for s in chosen}

    def run(stage: str, **extra: Any):
        fn, kwargs = functions[stage], {**options[stage], **extra}
        return fn(pipe, spec, configs[stage], **kwargs) if stage in configs else fn(pipe, spec, **kwargs)

    if len(chosen) == 1:
        return run(chosen[0])
    base = fingerprint(pipe)
    # Later stages take their targets from the ORIGINAL model (TRCE stage V, Eq. 6-7): keep a copy.
    reference = copy.deepcopy(pipe.unet).requires_grad_(False)
    done: list[tuple[str, Edit]] = []
    try:
        for i, stage in enumerate(chosen):
            edit = run(stage, **({"reference": reference} if i else {}))
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
                settings={"stages": list(chosen), **{s: e.settings for s, e in done}},
                info={s: e.info for s, e in done})


def erase_stage_v(pipe, spec, config=None, *, reference=None, cache_dir=None, progress: bool = True):
    """TRCE stage V for a ConceptSpec (or a list): its (malicious, safe) prompt pairs go to
    `trce.methods.stage_v.erase_v`, with `reference` the original model when stage T ran first."""
    from trce.concepts import as_specs, spec_record
    from trce.methods.prior import cache_dir as default_cache

    try:
        from trce.methods.stage_v import StageVConfig, erase_v
    except ModuleNotFoundError as exc:
        if exc.name != "trce.methods.stage_v":
            raise
        raise TrceError("stage V is not available yet in method 'trce' (use --stages T)") from exc
    pairs = [(p.malicious, p.safe) for s in as_specs(spec) for p in s.pairs()]
    folder = default_cache(cache_dir) / "stage-v"
    return erase_v(pipe, pairs, config if config is not None else StageVConfig(), reference=reference,
                   cache_dir=folder, spec=spec_record(spec), progress=progress)


def erase_kpop_spec(pipe, spec, config=None, *, data_dir=None, progress: bool = True):
    """KPOP for a ConceptSpec (or a list): the spec's malicious prompts are the erase prompts c_e, their safe
    counterparts the neutral prompts of `neutral: safe`, its preservation prompts those of `preserve_weight`, and
    the same prompts naming its other erased concepts those of `negative_others`."""
    from trce.concepts import as_specs, spec_record
    from trce.methods.kpop import KPOPConfig, erase_kpop

    config = config if config is not None else KPOPConfig()
    specs = as_specs(spec)
    safe = {p.malicious: p.safe for s in specs for p in s.pairs()}  # each erase prompt's safe counterpart
    prompts = list(safe)
    keep = None
    if config.preserve_weight > 0:  # read only when used: COCO captions need the data folder
        keep = list(dict.fromkeys(p for s in specs for p in s.preservation_prompts(data_dir)))
    others = None
    if config.negative_others > 0:  # each erase prompt with the spec's other erased concepts in its slot
        from trce.concepts import other_concept_prompts

        table = other_concept_prompts(specs)
        others = [table[m] for m in prompts]
    return erase_kpop(pipe, prompts, config, spec=spec_record(spec), safe_prompts=[safe[m] for m in prompts],
                      preserve_prompts=keep, other_prompts=others, progress=progress)


def erase_esd_spec(pipe, spec, config=None, *, progress: bool = True):
    """ESD for a ConceptSpec (or a list): the spec's malicious prompts are the erase prompts c_e."""
    from trce.concepts import as_specs, spec_record
    from trce.methods.esd import ESDConfig, erase_esd

    prompts = list(dict.fromkeys(p.malicious for s in as_specs(spec) for p in s.pairs()))
    return erase_esd(pipe, prompts, config if config is not None else ESDConfig(), spec=spec_record(spec),
                     progress=progress)


def stage_config(method: str, stage: str, values: Mapping[str, Any] | None = None, seed: int | None = None):
    """The config object of one stage, from a mapping of its settings (unknown keys refused by name)."""
    import dataclasses

    values = dict(values or {})
    if (method, stage) == ("trce", "V"):
        from trce.methods.stage_v import StageVConfig as cls
    elif method == "kpop":
        from trce.methods.kpop import KPOPConfig as cls
    elif method == "esd":
        from trce.methods.esd import ESDConfig as cls
    else:
        raise TrceError(f"stage {stage!r} of method {method!r} takes no settings section")
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        choose(f"{method} {stage} setting", key, fields)
    if seed is not None and "seed" in fields:
        values.setdefault("seed", seed)
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in values.items():
        values[key] = _coerce(value, hints[key], key)
    return cls(**values)


def spec_settings(spec, stage: str, *overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Settings of `stage`: the spec's recommended `settings` (each spec of a list in turn), then
    each of `overrides` on top (a --config section, then --set)."""
    from trce.concepts import as_specs

    merged: dict[str, Any] = {}
    for s in as_specs(spec):
        merged.update(s.settings.get(stage, {}))
    for layer in overrides:
        merged.update(layer or {})
    return merged


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Strings from `--set key=value` to the field's type (int, float, bool, None); others pass through."""
    if not isinstance(value, str):
        return value
    text = str(hint)
    if value.lower() in ("none", "null") and "None" in text:
        return None
    try:
        if text.startswith("int") or text == "<class 'int'>":
            return int(value)
        if text.startswith("float") or text == "<class 'float'>":
            return float(value)
        if text.startswith("bool") or text == "<class 'bool'>":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
    except ValueError:
        raise TrceError(f"setting {key}={value!r} is not a valid {text.split()[0]}") from None
    return value
