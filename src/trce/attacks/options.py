"""`AttackOptions`: what an attack run (`trce.attacks.run`) depends on besides the model, the edit, the attack and
its budget."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trce.errors import check_integer, check_seed
from trce.eval.options import ImageOptions


@dataclass(frozen=True)
class AttackOptions(ImageOptions):
    """What an attack run depends on besides the model, the edit, the attack and its budget."""

    limit: int | None = None  # first N prompts of a real suite; N prompts per group of a ShapeWorld suite
    seed: int = 0  # seed of the searches (images use the prompts' own seeds)
    groups: str | Sequence[str] = "keyword"  # ShapeWorld suites: the groups whose prompts are attacked
    concept: str | None = None  # spec whose single words are banned (default: the suite's concept)
    ban: str | Sequence[str] | None = None  # more banned words
    pairs: str | None = None  # ring-a-bell: a CSV of (sensitive, normal) prompts or a spec name
    data: str | None = None  # the suite's prompt file, or a folder holding it
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.limit is not None:
            check_integer(self.limit, "limit", at_least=1)
        check_seed(self.seed, "seed")

    def group_list(self) -> list[str]:
        items = self.groups.split(",") if isinstance(self.groups, str) else list(self.groups)
        return [g.strip() for g in items if g.strip()]

    def ban_list(self) -> list[str]:
        items = (self.ban or "").split(",") if isinstance(self.ban, (str, type(None))) else list(self.ban)
        return [w.strip() for w in items if w.strip()]
