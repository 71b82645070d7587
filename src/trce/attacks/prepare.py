"""An attack run's inputs, checked before a model is loaded (`prepare`): the attack module and its budget, the suite's
targets, the banned concept words and Ring-A-Bell's prompt pairs, the image settings; and the targets a hardened
patch is attacked on (`hold_out_targets`)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trce.attacks.options import AttackOptions
from trce.errors import TrceError, choose

log = logging.getLogger(__name__)


def _budget(mod, budget: Any):
    """(Budget, the keys the caller set)."""
    from trce.attacks.budget import parse_budget

    if budget is None:
        return mod.Budget(), set()
    if isinstance(budget, mod.Budget):
        return budget, {f.name for f in dataclasses.fields(mod.Budget)}
    if isinstance(budget, Mapping):
        items = [f"{k}={v}" for k, v in budget.items()]
    elif isinstance(budget, str):
        items = budget.split()
    else:
        items = [str(b) for b in budget]
    return parse_budget(mod.Budget, items, mod.NAME), {str(b).partition("=")[0].strip().replace("-", "_")
                                                        for b in items}


def _targets(suite, opts: AttackOptions):
    """(targets, the suite rows they come from)."""
    from trce.attacks.targets import Target
    from trce.eval.suites import ERASURE_GROUPS

    if suite.kind == "shapeworld":
        groups = opts.group_list()
        if not groups:
            raise TrceError("groups needs at least one of keyword, synonym, paraphrase", field="groups")
        for g in groups:
            choose("attack group", g, [x for x in ERASURE_GROUPS if x in suite.groups])
        rows = [r for r in suite.rows(None, opts.limit) if r.category in groups]
    else:
        rows = suite.rows(opts.data, opts.limit)
    d = suite.defaults
    targets = [Target(index=i, prompt=r.prompt, seed=r.seed if r.seed is not None else d.seed + i,
                      guidance=r.guidance, case_number=r.case_number) for i, r in enumerate(rows)]
    return targets, rows


def _concept(suite, opts: AttackOptions, attack_name: str) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...], dict]:
    """(banned words, ring-a-bell pairs, a record of where they came from)."""
    from trce.attacks import ring_a_bell as rab
    from trce.attacks import vocabulary
    from trce.concepts import load_spec

    spec = None
    if opts.concept is not None:
        spec = load_spec(opts.concept)
    elif suite.kind == "real":
        if suite.detector != "nudenet":
            raise TrceError(f"concept: suite {suite.name} is not a ShapeWorld or nudity suite; name the attacked "
                            "concept (its words are banned from adversarial tokens)", field="concept")
        spec = load_spec("sexual")
    if spec is not None:
        banned = vocabulary.spec_banned(spec)
    else:
        banned = vocabulary.shapeworld_banned(suite.attribute, suite.values)
    extra = tuple(opts.ban_list())
    record = {"concept": spec.name if spec is not None else f"{suite.attribute}={'+'.join(suite.values)}",
              "banned": sorted({*banned, *(w.lower() for w in extra)})}
    pairs: list[tuple[str, str]] = []
    if attack_name == "ring-a-bell":
        if opts.pairs is not None:
            path = Path(opts.pairs).expanduser()
            if path.suffix.lower() == ".csv" or path.is_file():
                pairs, record["pairs_source"] = rab.pairs_from_file(path), str(path)
            else:
                pairs, record["pairs_source"] = rab.pairs_from_spec(load_spec(opts.pairs)), f"spec {opts.pairs}"
        elif suite.kind == "shapeworld":
            pairs = rab.shapeworld_pairs(suite.attribute, suite.values, n=64, seed=opts.seed)
            record["pairs_source"] = f"ShapeWorld captions, {suite.attribute} {'/'.join(suite.values)} vs other values"
        else:
            pairs, record["pairs_source"] = _default_pairs(opts, spec, rab)
        record["pairs"] = len(pairs)
    return (*banned, *extra), tuple(pairs), record


def _default_pairs(opts: AttackOptions, spec, rab) -> tuple[list[tuple[str, str]], str]:
    """Ring-A-Bell's nudity pairs file where `data`/$TRCE_DATA has it, else the concept spec's pairs."""
    from trce.eval.suites import find_data, load_suite

    folder = None
    if opts.data is not None:
        p = Path(opts.data).expanduser()
        folder = p if p.is_dir() else p.parent
    try:
        path = find_data(load_suite("ring-a-bell"), folder)
        return rab.pairs_from_file(path), str(path)
    except TrceError:
        log.info("nudity-ring-a-bell.csv not found (data or $TRCE_DATA): using the %s spec's prompt pairs", spec.name)
        return rab.pairs_from_spec(spec), f"spec {spec.name}"


def prepare(suite: str, attack_name: str, budget: Any, opts: AttackOptions):
    """Everything checked before a model is loaded: the attack module, its budget, the suite's targets, the
    banned words and pairs, the image settings (what `trce attack` validates first)."""
    from trce.attacks import get_attack
    from trce.eval.suites import load_suite
    from trce.generate import GenSettings

    mod = get_attack(attack_name)
    budget, given = _budget(mod, budget)
    suite = load_suite(suite)
    targets, rows = _targets(suite, opts)
    if not targets:
        raise TrceError(f"suite {suite.name} gave no prompts to attack")
    banned, pairs, concept_record = _concept(suite, opts, mod.NAME)
    d = suite.defaults
    size = opts.size if opts.size is not None else d.size
    settings = GenSettings(steps=opts.steps if opts.steps is not None else d.steps,
                           guidance=opts.guidance if opts.guidance is not None else d.guidance,
                           height=size, width=size, batch_size=opts.batch_size or d.batch_size)
    if hasattr(budget, "reference_steps") and "reference_steps" not in given:
        # reference image 0 of a target is then the very image `trce eval` draws with the original model
        budget = dataclasses.replace(budget, reference_steps=settings.steps)
    guidances = [float(opts.guidance if opts.guidance is not None else t.guidance if t.guidance is not None
                       else settings.guidance) for t in targets]
    targets = [dataclasses.replace(t, guidance=g) for t, g in zip(targets, guidances)]  # reference images match
    detector_name = opts.detector or suite.detector
    if detector_name == "shapeworld" and suite.kind != "shapeworld":
        raise TrceError("the shapeworld detector judges ShapeWorld suites only; choose another detector",
                        field="detector")
    return {"mod": mod, "budget": budget, "suite": suite, "targets": targets, "rows": rows, "banned": banned,
            "pairs": pairs, "concept": concept_record, "size": size, "settings": settings, "guidances": guidances,
            "detector": detector_name}


def hold_out_targets(p: dict, edit, say: bool = True) -> dict:
    """The `prepare`d run without the targets a hardened `edit` saw (`trce.attacks.held_out`), its record under
    "held_out" (None for an edit not hardened, or no edit); `say`: log the one line saying how many."""
    from trce.attacks.held_out import hold_out

    if edit is None:
        return {**p, "held_out": None}
    keep, record = hold_out(edit, p["targets"], say=say)
    if record is None or len(keep) == len(p["targets"]):
        return {**p, "held_out": record}
    return {**p, "targets": [p["targets"][i] for i in keep], "rows": [p["rows"][i] for i in keep],
            "guidances": [p["guidances"][i] for i in keep], "held_out": record}
