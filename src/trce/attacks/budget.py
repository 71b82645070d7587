"""Attack budgets: checking, parsing and labelling an attack module's `Budget`, its named presets, and how digests
and run keys record it.

Budget presets. An attack's `Budget` may declare `PRESETS: ClassVar[dict[str, dict]]` (e.g. `{"fast": {...}}`)
and a `preset: str = ""` field. `--budget preset=fast` (`parse_budget`), `budget={"preset": "fast", ...}`
(`make_budget`) and `from_preset(Budget, "fast", **overrides)` start from the preset's values, then apply the
other keys on top; the name is recorded in the budget, so digests and run keys differ from the attack's faithful
default, and `budget_label` names it in every table ("unlearndiff (fast preset)", with any setting changed on top:
"mma-text (fast preset + steps=5)"; a budget changed without a preset is labelled by its changes). A budget without
a preset (`preset=""`, the default) is the attack as its authors ran it; `budget_key` leaves an empty `preset` out,
so digests made before presets existed still match. An unknown name is one TrceError listing the available ones.

Every budget has `restarts` (default 1, `restarts_of`): independent searches per target (`trce.attacks.restarts`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from trce.errors import TrceError, choose


def check_budget(budget: Any, attack: str, positive: Sequence[str] = (), unit: Sequence[str] = ()) -> None:
    """Every number finite and >= 0; `positive` ones > 0; `unit` ones in [0, 1]; TrceError names the key.
    `restarts` (every attack's) is always positive."""
    positive = (*positive, "restarts")
    check_budget_preset(budget, attack)
    restarts = getattr(budget, "restarts", 1)
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise TrceError(f"{attack} budget restarts must be a positive integer, got {restarts!r}")
    for f in fields(budget):
        value = getattr(budget, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value) or value < 0 or (f.name in positive and value <= 0):
            need = "a positive" if f.name in positive else "a non-negative"
            raise TrceError(f"{attack} budget {f.name} must be {need} number, got {value}")
        if f.name in unit and value > 1:
            raise TrceError(f"{attack} budget {f.name} must be in [0, 1], got {value}")


PRESET = "preset"


def presets_of(budget_cls: type) -> dict[str, dict]:
    """The named presets a Budget class declares (`PRESETS`; {} when none)."""
    return dict(getattr(budget_cls, "PRESETS", None) or {})


def check_preset(budget_cls: type, name: str, attack: str) -> dict:
    """The values of preset `name` of `budget_cls`; an unknown name is one TrceError naming the available ones."""
    presets = presets_of(budget_cls)
    if PRESET not in {f.name for f in fields(budget_cls)} or not presets:
        raise TrceError(f"{attack} has no budget presets (asked for {name!r})")
    if name not in presets:
        raise TrceError(f"{attack} has no budget preset {name!r}; available: {', '.join(sorted(presets))}")
    return dict(presets[name])


def from_preset(budget_cls: type, name: str, attack: str | None = None, **overrides) -> Any:
    """A `budget_cls` from its preset `name` ("" or None: the defaults), `overrides` on top; the name recorded."""
    if not name:
        return budget_cls(**overrides)
    values = check_preset(budget_cls, name, attack or budget_cls.__module__.rpartition(".")[2])
    return budget_cls(**{**values, **overrides, PRESET: name})


def make_budget(budget_cls: type, values: Any, attack: str) -> Any:
    """A `budget_cls` from a mapping of its fields, `preset` first (`from_preset`); unknown keys name the valid ones."""
    values = dict(values)
    names = {f.name for f in fields(budget_cls)}
    for key in values:
        if key == PRESET and key not in names:
            check_preset(budget_cls, str(values[key]), attack)
        choose(f"{attack} budget key", key, names)
    name = values.pop(PRESET, "")
    return from_preset(budget_cls, str(name or ""), attack, **values)


def budget_label(attack: str, budget: Any) -> str:
    """The attack's name as tables show it, with every way its budget departs from the authors' default:
    "unlearndiff" (the faithful default), "unlearndiff (fast preset)", "mma-text (fast preset + steps=5)",
    "ring-a-bell (generations=100)". A budget given as a mapping (an old record) is labelled by its preset alone."""
    if budget is None or isinstance(budget, dict):
        preset = (budget or {}).get(PRESET, "")
        return f"{attack} ({preset} preset)" if preset else attack
    preset = getattr(budget, PRESET, "")
    base = from_preset(type(budget), preset, attack) if preset else type(budget)()
    changed = [f"{f.name}={getattr(budget, f.name)}" for f in fields(budget)
               if f.name != PRESET and getattr(budget, f.name) != getattr(base, f.name)]
    parts = ([f"{preset} preset"] if preset else []) + ([", ".join(changed)] if changed else [])
    return f"{attack} ({' + '.join(parts)})" if parts else attack


def record_label(attack: dict) -> str:
    """An attack record's (metrics.json `attack`) name as tables show it: its `display`, or for a record written before
    `display` existed, its name with the preset it records."""
    if attack.get("display"):
        return str(attack["display"])
    budget = attack.get("budget") if isinstance(attack.get("budget"), dict) else {}
    return budget_label(str(attack["name"]), {PRESET: attack.get(PRESET) or budget.get(PRESET, "")})


def check_budget_preset(budget: Any, attack: str) -> None:
    """A budget's recorded preset name must be one its class declares (called by `check_budget`)."""
    name = getattr(budget, PRESET, "")
    if not isinstance(name, str):
        raise TrceError(f"{attack} budget preset must be a name, got {name!r}")
    if name:
        check_preset(type(budget), name, attack)


def parse_budget(budget_cls: type, items: Sequence[str], attack: str, base: Any = None) -> Any:
    """`["steps=40", "lr=0.01"]` -> a `budget_cls` (from `base`, else its defaults); keys may use - or _.

    `preset=NAME` is applied first (from the preset's values, not `base`), then the other keys on top; a key given
    twice is refused."""
    current = base if base is not None else budget_cls()
    names = {f.name for f in fields(budget_cls)}
    items = [str(i) for i in items]
    preset = [i for i in items if i.partition("=")[0].strip().replace("-", "_") == PRESET]
    if preset:
        if len(preset) > 1:
            raise TrceError(f"--budget takes one preset, got {len(preset)}")
        name = preset[0].partition("=")[2].strip()
        current = from_preset(budget_cls, name, attack)
        items = [i for i in items if i not in preset]
    values: dict[str, Any] = {}
    given: dict[str, str] = {}  # key -> the item that gave it: a key given twice is refused, not the last one taken
    for item in items:
        key, sep, raw = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise TrceError(f"--budget takes key=value pairs, got {item!r}")
        choose(f"{attack} budget key", key, names)
        if key in given:
            raise TrceError(f"--budget gives {key} twice ({given[key]} and {item}); give each key once")
        given[key] = item
        default = getattr(current, key)
        raw = raw.strip()
        try:
            if isinstance(default, bool):
                if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(raw)
                value: Any = raw.lower() in ("1", "true", "yes")
            elif isinstance(default, int):
                value = int(raw)
            elif isinstance(default, float):
                value = float(raw)
            else:
                value = raw
        except ValueError as exc:
            kind = type(default).__name__
            raise TrceError(f"{attack} budget {key} must be {kind}, got {raw!r}") from exc
        values[key] = value
    return dataclasses.replace(current, **values)


def budget_key(budget: Any) -> dict | None:
    """A budget as the digests and run keys record it: `restarts` left out at its default 1 and `preset` when
    empty, so that results and run folders made before restarts and presets existed still match."""
    if budget is None:
        return None
    d = dataclasses.asdict(budget)
    if d.get("restarts") == 1:
        del d["restarts"]
    if d.get(PRESET, None) == "":
        del d[PRESET]
    return d


def restarts_of(budget: Any) -> int:
    """The budget's number of independent searches per target (1 for a budget without `restarts`)."""
    return int(getattr(budget, "restarts", 1) or 1)
