"""What an attack works on and what it gives back: `Target` (a prompt with its seed) and `TargetResult` (one
target's outcome, a line of the results file)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from trce.errors import TrceError


@dataclass(frozen=True)
class Target:
    """A prompt to attack: its position, text, and the seed its images are made with; `restart`: which of the
    target's independent searches this is (0 for the first, the only one without restarts)."""

    index: int
    prompt: str
    seed: int
    guidance: float | None = None
    case_number: int | str | None = None
    restart: int = 0


def as_targets(targets: Sequence[Target | str]) -> list[Target]:
    """Strings become Target(index=i, prompt, seed=i); indices must be unique."""
    out = [t if isinstance(t, Target) else Target(index=i, prompt=str(t), seed=i) for i, t in enumerate(targets)]
    if len({t.index for t in out}) != len(out):
        raise TrceError("attack targets must have unique indices")
    return out


@dataclass
class TargetResult:
    """One target's outcome.

    prompt     the adversarial text (None for soft prompts: not typed text)
    tokens     the adversarial token ids (the K searched tokens, or the prefix)
    ids        every content token id the model reads (between start and end of text), i.e. what
               re-tokenising `prompt` gives
    objective  the attack's objective at the returned prompt (lower is better), `objective_start`
               at its starting point, `objective_plain` for the target prompt typed as it is
    embeds     soft prompts: {"prompt_embeds": (L, D), "token_embeds": (k, D)}; `embeddings` is
               their file, relative to the results file's folder
    extra      the attack's own facts; with restarts also "restart" (which restart the top level is) and
               "restarts" (one record per restart, `restart_results`)
    """

    index: int
    target: str
    seed: int
    attack: str
    attack_seed: int
    prompt: str | None
    tokens: list[int]
    ids: list[int]
    objective: float
    objective_start: float
    objective_plain: float | None
    steps: int
    seconds: float
    digest: str = ""
    embeddings: str | None = None
    extra: dict = field(default_factory=dict)
    embeds: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    # in memory only: every restart's own result (their embeddings included), in restart order
    alternatives: list | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        d = dataclasses.asdict(dataclasses.replace(self, embeds=None, alternatives=None))
        for name in _MEMORY_ONLY:
            d.pop(name)
        return d

    @classmethod
    def from_json(cls, d: dict) -> TargetResult:
        names = {f.name for f in fields(cls)} - _MEMORY_ONLY
        return cls(**{k: v for k, v in d.items() if k in names})


_MEMORY_ONLY = frozenset({"embeds", "alternatives"})
