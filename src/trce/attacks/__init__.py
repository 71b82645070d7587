"""Red-team attacks that run against the model under test (`trce attack`).

Each attack is one module with one plain function
`attack(pipe, targets, config, *, reference=None, progress=True) -> list[TargetResult]`,
a `Budget` dataclass (its search budget, recorded in every result), and `NAME`, `LABEL`,
`TYPED` (whether results are prompts anyone can type), `NEEDS_REFERENCE` (whether it needs the
original model's images of the concept) and, optionally, `JUDGED` (whether its `attack` takes `judge=`):

- `ring-a-bell`  Tsai et al. 2023: concept vector + genetic search over real tokens (text encoder only);
- `mma-text`     Yang et al. 2024: greedy coordinate gradient over real tokens, concept words banned;
- `unlearndiff`  Zhang et al. 2024: a k-token prefix optimised through the model under test;
- `soft-prompt`  the same objective with free embeddings: "knowledge left", not a typed threat.

Every budget has `restarts` (independent searches per target; `trce.attacks.restarts`); a budget may declare named
presets (`PRESETS`, `--budget preset=fast`: `trce.attacks.budget`), its default being the attack as its authors ran it.
Attacks that judge inside their search (`JUDGED = True`: unlearndiff) also take `judge(target, prompt) -> bool`,
which `trce attack` builds from the suite's detector. `get_attack(name)` returns
the module; shared pieces are in `trce.attacks.base`; `trce.attacks.held_out` keeps hardened patches from being
attacked on the prompts they were hardened on.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from trce.errors import choose

ATTACKS: dict[str, str] = {
    "ring-a-bell": "trce.attacks.ring_a_bell",
    "mma-text": "trce.attacks.mma_text",
    "unlearndiff": "trce.attacks.unlearndiff",
    "soft-prompt": "trce.attacks.soft_prompt",
}

__all__ = ["ATTACKS", "get_attack"]


def get_attack(name: str) -> ModuleType:
    """The attack module called `name`; a typo lists the available names."""
    return importlib.import_module(ATTACKS[choose("attack", name, ATTACKS)])


def _names() -> list[str]:
    """Names of the red-team attacks `trce.attack` runs."""
    return list(ATTACKS)


from trce.utils import callable_module

callable_module(__name__, _names)  # `trce.attacks()`
