"""The method registry: one entry per erasure method owns everything about it.

An entry (`Method`) names the method's stages in the order they run, and for each stage the
function that runs it and the dataclass that holds its settings, as "module:attribute" strings,
so that reading the registry imports no method (and `trce.concepts` can validate a spec's
`settings:` through it without importing `trce.methods`). It also holds what reports show: the
display name, and whether the label names the stages ("TRCE (T+V)").

A stage function has one signature for every method:

    run(pipe, specs: list[ConceptSpec], config: <its config dataclass>, context: Context) -> Edit

`Context` carries what is not a setting of the method (seed, data and cache folders, progress bars,
the frozen original model when an earlier stage already edited the pipeline). Settings sections
are keyed by stage name: a spec's `settings: {V: {...}, kpop: {...}}`, `trce.erase(..., V={...})`
and `trce erase --set V.lr=...` all name the stage whose config they fill. Two methods may share a
stage name only with the same config class (TRCE's stage T and its [KEY] ablation's, `trce-key`).

Adding a method: write its module (stage functions and config dataclasses) and add one entry to
`METHODS` below, or call `register(Method(...))` from your own code.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trce.errors import TrceError, choose


def _load(ref: str, what: str):
    module_name, _, attribute = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise TrceError(f"{what} is not available: module {module_name} is missing") from exc
    if not hasattr(module, attribute):
        raise TrceError(f"{what} is not available: {module_name} has no {attribute}")
    return getattr(module, attribute)


@dataclass(frozen=True)
class Stage:
    """One stage of a method: `run` ("module:function") and `config` ("module:Class")."""

    name: str
    run: str
    config: str
    description: str = ""

    def function(self, method: str):
        return _load(self.run, f"stage {self.name} of method {method!r}")

    def config_class(self) -> type:
        return _load(self.config, f"the settings of stage {self.name}")


@dataclass(frozen=True)
class Method:
    name: str
    display: str  # the name reports show ("TRCE", "UCE")
    description: str
    stages: tuple[Stage, ...]  # in the order they run
    default_stages: tuple[str, ...] = ()  # empty: every stage
    label_stages: bool = False  # reports label it with the stages it ran: "TRCE (T+V)"

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        if not names or len(set(names)) != len(names):
            raise TrceError(f"method {self.name!r} must list its stages once each, got {names}")
        if not self.default_stages:
            object.__setattr__(self, "default_stages", tuple(names))
        for s in self.default_stages:
            if s not in names:
                raise TrceError(f"method {self.name!r}: default stage {s!r} is not one of its stages {names}")

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise TrceError(f"method {self.name!r} has no stage {name!r}; its stages: {', '.join(self.stage_names)}")

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def parse_stages(self, stages: str | Sequence[str] | None) -> tuple[str, ...]:
        """"T", "V", "T,V" or a sequence -> stage names in the method's order, validated."""
        if stages is None:
            return self.default_stages
        items = [s.strip() for s in (stages.split(",") if isinstance(stages, str) else stages)]
        if not items or any(not s for s in items):
            raise TrceError(f"bad stages {stages!r}; use a comma-separated list of {', '.join(self.stage_names)}")
        for s in items:
            self.stage(s)
        return tuple(s for s in self.stage_names if s in items)

    def label(self, stages: Sequence[str] | None = None) -> str:
        """The report label: "TRCE (T+V)" for a method labelled by stages, else the display name."""
        if stages and (self.label_stages or len(stages) > 1):
            return f"{self.display} ({'+'.join(stages)})"
        return self.display


@dataclass(frozen=True)
class Context:
    """What a stage needs besides the model, the concepts and its settings.

    seed        the run's seed (stages whose config has a `seed` take it unless a setting names one)
    data_dir    the data folder (COCO captions for `preserve: coco`); None: $TRCE_DATA
    cache_dir   priors, trajectory caches and checkpoints; None: $TRCE_CACHE or ~/.cache/trce
    use_cache   read and write the caches (False: compute everything, write nothing)
    progress    progress bars
    reference   the frozen ORIGINAL denoiser when an earlier stage already edited the pipeline
    checkpoint_dir  where a training stage keeps its checkpoints (None: a folder per run under the cache)
    """

    seed: int = 0
    data_dir: str | Path | None = None
    cache_dir: str | Path | None = None
    use_cache: bool = True
    progress: bool = True
    reference: Any = field(default=None, repr=False)
    checkpoint_dir: str | Path | None = None


# --------------------------------------------------------------------------- the entries
METHODS: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Add a method (tests and plug-ins); a stage name shared with another method must share its config."""
    if method.name in METHODS and not replace:
        raise TrceError(f"method {method.name!r} is already registered")
    for stage in method.stages:
        for other in METHODS.values():
            if other.name == method.name:
                continue
            for s in other.stages:
                if s.name == stage.name and s.config != stage.config:
                    raise TrceError(f"stage {stage.name!r} of method {method.name!r} has config {stage.config}, but "
                                    f"method {other.name!r} names its settings section {s.name!r} with {s.config}; "
                                    "choose another stage name")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    METHODS.pop(name, None)


_T = "trce.methods.stage_t:StageTConfig"
register(Method(
    name="trce", display="TRCE",
    description="TRCE (Chen et al. 2025): T = closed-form [EoT] edit of cross-attention K/V (Eq. 5); "
                "V = denoising-trajectory steering of the visual layers (Eq. 6-9)",
    stages=(Stage("T", "trce.methods.stage_t:run_trce", _T, "closed-form edit of the text projections (Eq. 5)"),
            Stage("V", "trce.methods.stage_v:run", "trce.methods.stage_v:StageVConfig",
                  "trajectory steering of the visual layers (Eq. 6-9)")),
    label_stages=True,  # labelled with its stages as in the paper: TRCE (T), TRCE (T+V)
))
register(Method(
    name="uce", display="UCE",
    description="UCE (Gandikota et al. 2024) as its authors' train_erase.py computes it: the last content token and "
                "every later position of each concept prompt mapped onto its target's, '' (and any preserve "
                "concepts) retained over every position, lambda 0.5 towards the original weights",
    stages=(Stage("uce", "trce.methods.uce:run_uce", "trce.methods.uce:UCEConfig",
                  "UCE's closed-form edit of the text projections (train_erase.py edit_model)"),),
))
register(Method(
    name="trce-key", display="TRCE [KEY] (Table 4 ablation)",
    description="TRCE's [KEY]-token ablation (paper Table 4): stage T's closed form (prior, eta, relative ridge) on the "
                "keyword tokens (token role 'key') instead of [EoT]; not UCE",
    stages=(Stage("T", "trce.methods.stage_t:run_trce_key", _T, "closed-form edit at the keyword tokens"),),
))
register(Method(
    name="rece", display="RECE",
    description="RECE (Gong et al. 2024) as its authors' train.py computes it: UCE, then rounds of closed-form "
                "adversarial embeddings (every position of the concept prompt, absolute lambda) mapped onto every "
                "position of the target (' ' in the authors' recipe), each re-solved on top of the previous round",
    stages=(Stage("rece", "trce.methods.uce:run_rece", "trce.methods.uce:RECEConfig",
                  "UCE, then RECE's closed-form adversaries and re-solves (train.py)"),),
))
register(Method(
    name="kpop", display="KPOP",
    description="KPOP: a learnable prompt in cross-attention absorbs the concept while the model forgets it "
                "(alternating knowledge transfer and removal, Eq. 5-7); the prompt ships in the patch",
    stages=(Stage("kpop", "trce.methods.kpop:run", "trce.methods.kpop:KPOPConfig"),),
))
register(Method(
    name="esd", display="ESD",
    description="ESD baseline (Gandikota et al. 2023): fine-tune the denoiser to predict the negatively guided "
                "neutral noise on the erase prompts; params cross-attn = ESD-x, non-cross-attn = ESD-u",
    stages=(Stage("esd", "trce.methods.esd:run", "trce.methods.esd:ESDConfig"),),
))
register(Method(
    name="advunlearn", display="AdvUnlearn",
    description="AdvUnlearn baseline (Zhang et al. 2024): ESD's loss at adversarial soft-prompt prefixes found against "
                "the current model each step, plus a utility term on the preservation prompts; trains the text "
                "encoder (module=unet: the denoiser as ESD-x/-u)",
    stages=(Stage("advunlearn", "trce.methods.advunlearn:run", "trce.methods.advunlearn:AdvUnlearnConfig",
                  "min-max: inner soft-prompt attack, outer ESD step + utility term"),),
))


def get_method(name: str) -> Method:
    return METHODS[choose("method", str(name), METHODS)]


def method_names() -> list[str]:
    return sorted(METHODS)


def sections() -> dict[str, Stage]:
    """Settings section name -> the stage (of some method) whose config it fills."""
    out: dict[str, Stage] = {}
    for m in METHODS.values():
        for s in m.stages:
            out.setdefault(s.name, s)
    return out


def display_name(method: str | None, stages: Sequence[str] | None = None) -> str:
    """How reports name a patch's method ("TRCE (T+V)"); an unregistered name is shown as it is."""
    if not method:
        return "?"
    entry = METHODS.get(str(method).lower())
    if entry is None:
        return str(method)
    return entry.label(stages)


# --------------------------------------------------------------------------- settings
def make_config(section: str, values: Mapping[str, Any] | None = None, seed: int | None = None):
    """The config object of settings section `section` from a mapping (unknown names refused by name).

    Strings (from `--set key=value`) are converted to the field's type; `seed` fills a `seed`
    field the mapping does not set.
    """
    stage = sections().get(section)
    if stage is None:
        choose("settings section", section, sections())
    cls = stage.config_class()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = dict(values or {})
    for key in values:
        choose(f"{section} setting", key, fields)
    if seed is not None and "seed" in fields:
        values.setdefault("seed", seed)
    for key, value in values.items():
        values[key] = _coerce(value, fields[key].type, f"{section}.{key}")
    return cls(**values)


def check_settings(section: str, values: Any) -> dict[str, Any]:
    """Validate one settings section of a spec (names and values); returns it as a plain dict."""
    if not isinstance(values, Mapping) or not all(isinstance(k, str) for k in values):
        raise TrceError(f"must be a mapping of setting names to values, got {values!r}")
    make_config(section, values)
    return dict(values)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Strings from `--set key=value` to the field's type (int, float, bool, None); others pass through.

    A number that is not finite (nan, inf) is refused here: no setting of any method means it.
    """
    text = str(hint)
    if isinstance(value, float) and not math.isfinite(value):
        raise TrceError(f"setting {key}={value!r} must be a finite number")
    if not isinstance(value, str):
        return value
    if value.lower() in ("none", "null") and "None" in text:
        return None
    try:
        if text.startswith("int") or text == "<class 'int'>":
            return int(value)
        if text.startswith("float") or text == "<class 'float'>":
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(value)
            return number
        if text.startswith("bool") or text == "<class 'bool'>":
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
    except ValueError:
        raise TrceError(f"setting {key}={value!r} is not a valid {text.split()[0].split('|')[0]}") from None
    return value



def describe_methods() -> list[dict]:
    """What `trce methods` lists: each method, its stages, and the settings each stage takes (with defaults)."""
    rows = []
    for m in sorted(METHODS.values(), key=lambda m: m.name):
        stage_settings = []
        for s in m.stages:
            cls = s.config_class()
            values = {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
            stage_settings.append({"stage": s.name, "description": s.description,
                                   "settings": [f"{k}={v}" for k, v in values.items()]})
        rows.append({"name": m.name, "display": m.display, "description": m.description,
                     "stages": list(m.stage_names), "default_stages": list(m.default_stages),
                     "stage_settings": stage_settings})
    return rows
