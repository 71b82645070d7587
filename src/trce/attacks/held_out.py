"""Held-out targets for hardened patches: an attack must not be scored on the prompts the defence trained against.

A patch is *hardened* when its making attacked the model on prompts of its own spec and trained (or re-solved)
against what it found:

- stage T / trce-key / RECE with `robust` > 0 (`trce erase --robust R`, RECE's rounds; `trce.methods.robust`, `.uce`): its
  closed-form adversaries start from the erase rows of EVERY malicious prompt of the spec, its soft prompts
  attack a seeded subset of them (`robust_prompts` per round); any other stage whose settings record
  `robust` > 0 counts the same way;
- AdvUnlearn (`advunlearn`): its inner attack optimises prefixes before the spec's malicious prompts, all of
  them (`settings["erase_prompts"]`).

So the prompts a hardening saw are the malicious prompts of the spec(s) the patch records (patch.json `spec`,
regenerated here from the record, which holds the resolved expressions and templates; ShapeWorld specs' scenes
are deterministic in the recorded seed), plus any `erase_prompts` its settings list. `trce attack --patch`
drops every target whose prompt is one of them (compared case-insensitively, whitespace collapsed), counts
them in metrics.json (`held_out`), and searches with the seed stream `trce.attacks.base.HELD_OUT_STREAM`, so
that its searches cannot replay the hardening's seeds (see `target_seed`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from trce.errors import TrceError

log = logging.getLogger(__name__)

_MAX_DEPTH = 4  # settings nest by stage (multi-stage patches) and by method (combined edits), never deeper


def normalise(prompt: str) -> str:
    """How prompts are compared: case-insensitive, whitespace collapsed."""
    return " ".join(str(prompt).casefold().split())


def _rounds(value: Any) -> int:
    """The hardening rounds a `robust` setting asks for: an int, or stage T's record {"robust": R, ...}."""
    if isinstance(value, Mapping):
        value = value.get("robust")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    return int(value)


def _walk(settings: Any, where: str, depth: int = 0) -> Iterator[tuple[str, dict]]:
    """(place, settings mapping) of a patch's settings and every stage's or method's settings inside it."""
    if not isinstance(settings, Mapping) or depth > _MAX_DEPTH:
        return
    yield where, dict(settings)
    for key, value in settings.items():
        if isinstance(value, Mapping) and key != "robust":
            yield from _walk(value, f"{where}.{key}" if where else str(key), depth + 1)


def hardening(edit) -> dict | None:
    """What hardened `edit` (None: nothing did): {"by": ["stage T robust=2", ...], "erase_prompts": [...]}."""
    if edit is None:
        return None
    by: list[str] = []
    erase_prompts: list[str] = []
    for where, s in _walk(edit.settings or {}, ""):
        rounds = _rounds(s.get("robust"))
        if rounds > 0:
            stage = s.get("stage") or where
            by.append(f"{edit.method}{f' stage {stage}' if stage else ''} robust={rounds}")
        if "erase_prompts" in s and "attack_steps" in s:  # AdvUnlearn's settings (its config and erase prompts)
            by.append(f"{where or edit.method} adversarial training")
            erase_prompts += [str(p) for p in s.get("erase_prompts") or []]
    if str(edit.method).lower() == "advunlearn" and not any("adversarial training" in b for b in by):
        by.append("advunlearn adversarial training")
    if not by:
        return None
    return {"by": list(dict.fromkeys(by)), "erase_prompts": erase_prompts}


def _spec_from_record(record: Mapping) -> list:
    """The ConceptSpec(s) of a patch's spec record (`ConceptSpec.to_dict`, or {"name", "concepts": [...]})."""
    from dataclasses import fields

    from trce.concepts import ConceptSpec, Expression

    if isinstance(record.get("concepts"), list):
        return [s for r in record["concepts"] for s in _spec_from_record(r)]
    names = {f.name for f in fields(Expression)}
    expressions = tuple(Expression(**{k: v for k, v in e.items() if k in names}) for e in record["expressions"])
    return [ConceptSpec(name=str(record["name"]), expressions=expressions, templates=tuple(record["templates"]),
                        token_role=str(record.get("token_role", "eot")), attribute=record.get("attribute"),
                        values=tuple(record.get("values") or ()), contexts=int(record.get("contexts", 4)),
                        open=int(record.get("open", 0)), seed=int(record.get("seed", 0)),
                        family=record.get("family"))]


def seen_prompts(edit, hardened: dict) -> tuple[set[str], str]:
    """(normalised prompts the hardening saw, where they came from)."""
    seen = {normalise(p) for p in hardened["erase_prompts"]}
    sources = [f"{len(hardened['erase_prompts'])} erase prompts in its settings"] if hardened["erase_prompts"] else []
    record = edit.spec or {}
    if record.get("expressions") is not None or record.get("concepts") is not None:
        try:
            specs = _spec_from_record(record)
        except (KeyError, TypeError, ValueError, TrceError) as exc:
            from trce.concepts import load_spec

            log.warning("the patch's spec record does not read back (%s): using the spec named %r as it is now",
                        exc, record.get("name"))
            specs = [load_spec(str(record.get("name")))]
        prompts = [p.malicious for s in specs for p in s.pairs()]
        seen |= {normalise(p) for p in prompts}
        sources.append(f"the {len(set(prompts))} malicious prompts of spec {record.get('name')}")
    if not seen:
        raise TrceError(f"patch {edit.source or '(unsaved)'} is hardened ({', '.join(hardened['by'])}) but records "
                        "neither its spec nor its erase prompts: trce cannot tell which prompts it was hardened on, "
                        "so it cannot hold them out of the attack", field="patch")
    return seen, " and ".join(sources)


def hold_out(edit, targets: Sequence, what: str = "targets", say: bool = True) -> tuple[list[int], dict | None]:
    """(positions of the targets to keep, metrics.json's `held_out` record, None for a patch not hardened).

    Logs one line saying how many were held out (`say`: False on the other processes of a sharded run). Refuses
    (TrceError) when every target is one the hardening saw.
    """
    from trce.attacks.base import HELD_OUT_STREAM

    hardened = hardening(edit)
    if hardened is None:
        return list(range(len(targets))), None
    seen, source = seen_prompts(edit, hardened)
    keep = [i for i, t in enumerate(targets) if normalise(t.prompt) not in seen]
    dropped = [int(targets[i].index) for i in range(len(targets)) if i not in set(keep)]
    by = ", ".join(hardened["by"])
    record = {"dropped": len(dropped), "kept": len(keep), "dropped_indices": dropped,
              "reason": f"the patch is hardened ({by}); targets whose prompt is one it was hardened on ({source}) "
                        "are held out",
              "hardened_by": hardened["by"], "prompts_seen": len(seen), "seed_stream": HELD_OUT_STREAM}
    (log.info if say else log.debug)("held out %d of %d %s: prompts the hardened patch (%s) saw; attacking %d", len(dropped), len(targets),
             what, by, len(keep))
    if not keep:
        raise TrceError(f"every one of the {len(targets)} {what} is a prompt the patch was hardened on ({by}); "
                        "attack it on another suite or more prompts (--limit, --groups)", field="patch")
    return keep, record
