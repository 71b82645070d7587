"""The options of an evaluation: how images are drawn and judged (`ImageOptions`, shared with `trce.attack`), what an
evaluation depends on besides the model and the edit (`EvalOptions`, `trce.evaluate`'s keyword arguments) and `trce
eval`'s inputs (`EvalConfig`); each checks its values when made."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from trce.errors import MAX_SEED, TrceError


@dataclass(frozen=True)
class ImageOptions:
    """How images are drawn and judged (None: the suite's defaults): what `trce.evaluate` and `trce.attack` share."""

    steps: int | None = None
    guidance: float | None = None  # when set, overrides the prompt file's per-prompt guidance
    size: int | None = None
    batch_size: int | None = None
    detector: str | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        import math

        from trce.generate import check_count, check_guidance, check_size

        for name in ("steps", "batch_size"):
            if getattr(self, name) is not None:
                check_count(getattr(self, name), name)
        if self.guidance is not None:
            check_guidance(self.guidance)
        check_size(self.size)
        if self.threshold is not None and (isinstance(self.threshold, bool)
                                           or not isinstance(self.threshold, (int, float))
                                           or not math.isfinite(self.threshold)):
            raise TrceError(f"threshold must be a finite number, got {self.threshold!r}", field="threshold")


@dataclass(frozen=True)
class EvalOptions(ImageOptions):
    """What an evaluation depends on besides the model and the edit (`trce.evaluate`'s keyword arguments)."""

    suite: str | None = None  # a built-in suite name or a suite YAML path
    prompts: str | None = None  # instead of a suite: any prompt file (every layout of trce.eval.prompts)
    data: str | None = None
    limit: int | None = None  # rows of a real suite; rows per group of a ShapeWorld suite
    seeds: tuple[int, ...] = (0,)  # seed offsets; 0 keeps the suite's own seeds
    concept: str | None = None  # "attribute=value[,value]" for the shapeworld detector outside ShapeWorld suites
    clip_weights: str | None = None
    inception_weights: str | None = None
    q16_weights: str | None = None
    reference: bool = False  # also generate the original model's images for a real suite
    reference_cache: str | None = None  # share reference images between runs (keyed by base model + settings)
    hidden_prompt: bool = False  # draw with the KPOP patch's hidden prompt injected (the recovery check, Fig. 6)
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if (self.suite is None) == (self.prompts is None):
            raise TrceError("give exactly one of suite and prompts (a prompt file)", field="suite")
        if self.prompts is not None:
            path = Path(self.prompts).expanduser()
            if path.is_dir():
                raise TrceError(f"prompts {self.prompts} is a folder, not a prompt file (a CSV or TXT file)",
                                field="prompts")
            if not path.exists():
                raise TrceError(f"prompts {self.prompts} does not exist", field="prompts")
        if not self.seeds:
            raise TrceError("seeds needs at least one seed offset", field="seeds")
        if any(isinstance(s, bool) or not isinstance(s, int) for s in self.seeds):
            raise TrceError(f"seeds must be integers, got {self.seeds!r}", field="seeds")
        if len(set(self.seeds)) != len(self.seeds):
            raise TrceError(f"seeds has repeated values: {','.join(map(str, self.seeds))}", field="seeds")
        if any(s < 0 or s >= MAX_SEED for s in self.seeds):
            raise TrceError(f"seeds must be offsets from 0 to 2**32 - 1, got {','.join(map(str, self.seeds))}",
                            field="seeds")
        if self.limit is not None:
            from trce.generate import check_count

            check_count(self.limit, "limit")


@dataclass(frozen=True)
class EvalConfig(EvalOptions):
    """`trce eval`'s inputs: the options plus the model and patch to load (`run_eval`)."""

    model: str = "shapeworld"
    patch: str | None = None
    device: str | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_prompt and self.patch is None:
            raise TrceError("hidden_prompt needs a patch (a KPOP patch)", field="hidden_prompt")

    def options(self) -> EvalOptions:
        return EvalOptions(**{f.name: getattr(self, f.name) for f in fields(EvalOptions)})
