"""Random restarts: a target's independent searches combined into one result, read back, and the one kept.

Every attack's `Budget` has `restarts` (default 1): the driver (`trce.attacks.base.run_targets`) runs that many
independent searches per target, restart r seeded by `trce.attacks.base.target_seed` from (run seed, target seed,
target index, r). The target's line then holds every restart (`extra["restarts"]`, `restart_results` reads them back)
and its top level is the restart with the lowest objective (the attack's own pick, `combine_restarts`); `trce attack`
judges each restart's image and keeps the first that succeeds (`choose_restart`). Restart 0 is exactly the search of a
run without restarts, and with `restarts=1` nothing about a result changes: not its seed, its line, nor its digest.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path

from trce.attacks.targets import TargetResult

RESTART_SELECTION = ("success first (the detector's verdict on the restart's after-image), then the lowest "
                     "objective of the attack, then the lowest restart index")
_RESTART_FIELDS = ("attack_seed", "prompt", "tokens", "ids", "objective", "objective_start", "objective_plain",
                   "steps", "seconds", "embeddings", "extra")


def combine_restarts(parts: Sequence[TargetResult]) -> TargetResult:
    """One target's restarts as one result: the top level is the restart with the lowest objective (ties: the
    first), `extra["restart"]` says which, `extra["restarts"]` records each, `alternatives` holds them all."""
    best = min(range(len(parts)), key=lambda r: (parts[r].objective, r))
    top = parts[best]
    records = [{"restart": r, **{k: copy.deepcopy(getattr(p, k)) for k in _RESTART_FIELDS}}
               for r, p in enumerate(parts)]
    return dataclasses.replace(top, seconds=round(sum(p.seconds for p in parts), 3),
                               extra={**top.extra, "restart": best, "restarts": records}, alternatives=list(parts))


def restart_results(result: TargetResult, folder: Path | None = None) -> list[TargetResult]:
    """Every restart of one target's result, in restart order (the result alone when it has no restarts); their
    soft-prompt embeddings from memory, else from their files under `folder` (the results file's folder)."""
    records = result.extra.get("restarts")
    if not records:
        return [result]
    if result.alternatives is not None and len(result.alternatives) == len(records):
        return list(result.alternatives)
    out = []
    for rec in records:
        extra = dict(rec.get("extra") or {})
        part = dataclasses.replace(result, **{k: rec.get(k, getattr(result, k)) for k in _RESTART_FIELDS
                                              if k != "extra"}, extra=extra, embeds=None, alternatives=None)
        if part.embeddings is not None and folder is not None:
            from trce.utils import io

            part.embeds = io.load_tensors(folder / part.embeddings)
        out.append(part)
    return out


def choose_restart(objectives: Sequence[float], verdicts: Sequence[bool | None]) -> int:
    """The restart kept for a target (`RESTART_SELECTION`): the first to succeed by the detector's verdict (True;
    False and undecided None do not), then the lowest objective, then the lowest index."""
    return min(range(len(objectives)), key=lambda r: (verdicts[r] is not True, objectives[r], r))
