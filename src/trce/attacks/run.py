"""`trce.attack`: red-team a model (and an edit) with an attack that runs against it, and measure the ASR before
and after with the suite's detector, exactly as `trce.evaluate` measures it (`trce.eval.rows.generate_rows`,
`trce.eval.detectors.make_detector`, `trce.eval.metrics.rate`).

Output folder (`out`):

    out/trce.json              the folder's manifest (`trce.utils.folders`): kind "attack" and what the results and
                               images depend on (the targets included); a rerun with other values is refused
    out/results.jsonl          one line per attacked target (resume: finished targets are skipped)
    out/adversarial.csv        case_number, prompt, evaluation_seed, evaluation_guidance, target_prompt
                               (`trce eval --prompts out/adversarial.csv` replays them on any model);
                               soft-prompt rows hold a placeholder and an `embeddings` column instead
    out/embeddings/*.safetensors   soft-prompt only: prompt_embeds (L, D) and token_embeds (k, D)
    out/before/images, before/rows.jsonl   the target prompts as they are (ASR before)
    out/images, out/rows.jsonl             the adversarial prompts (ASR after)
    out/restarts/images, restarts/rows.jsonl   with `restarts=N` in the budget: every restart's adversarial
                               prompt, drawn and judged (images `{index}-r{restart}.png`)
    out/metrics.json           both rates with 95% Wilson intervals and the "attack" record

Random restarts (`--budget restarts=N`, every attack): N independent searches per target, seeded apart
(`trce.attacks.base.target_seed`). A target counts as broken when ANY restart's prompt succeeds (the detector's
verdict on its image); the restart kept for it, in adversarial.csv, images/ and rows.jsonl, is chosen by
`trce.attacks.restarts.RESTART_SELECTION`: success first, then the attack's own objective (lower is better). So
the ASR after is the any-restart rate; metrics.json's attack.restarts also gives each restart's own rate.
restarts=1 (the default) is the run without restarts, bit for bit.

Judged searches: an attack that declares `JUDGED = True` (unlearndiff, as its authors ran it) gets
`judge(target, prompt) -> bool`, the run's detector on the image `trce eval` draws from `prompt` at the target's seed
and guidance (`_judge`), and stops a target at its first success. metrics.json's attack record holds the full budget
(its `preset` included; `display` is the name tables show, e.g. "unlearndiff (fast preset)"), per target the
optimisation steps actually run (`steps`) and, for judged searches, the block that succeeded (`success_block`).

Hardened patches (`trce.attacks.held_out`): targets whose prompt the patch was hardened on are dropped (counted
in metrics.json `held_out`), and the searches use a seed stream of their own.

This module runs it (`attack`, `run_attack`): its options are `trce.attacks.options`, its inputs checked before a
model loads `trce.attacks.prepare`, its restarts judged `trce.attacks.restart_judging`, and what it writes
`trce.attacks.outputs`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from trce.attacks.options import AttackOptions
from trce.attacks.outputs import BEFORE, CSV_NAME, RESULTS, AttackResult, run_metrics, write_csv
from trce.attacks.prepare import hold_out_targets, prepare
from trce.errors import TrceError, choose
from trce.utils import folders


def attack(pipe, suite: str, attack: str, *, edit=None, budget: Any = None, out: str | Path | None = None,
           reference=None, **options) -> AttackResult | None:
    """Attack `pipe` (with `edit` applied for the duration, when given) on a suite's prompts; returns the metrics.

    attack     ring-a-bell, mma-text, unlearndiff or soft-prompt (`trce.attacks.ATTACKS`)
    edit       an `Edit` (from `trce.erase` or `trce.load_patch`) or a patch folder
    budget     the attack's `Budget`, a mapping of its fields, or ["key=value", ...] (None: its defaults);
               `restarts=N` (every attack): N searches per target, broken when any succeeds (the module doc)
    out        the run folder; rerunning into it resumes. None: a temporary folder, removed afterwards
    reference  the ORIGINAL model for the white-box attacks' images of the concept (a pipeline); None:
               `pipe` without the edit
    options    any field of `AttackOptions`: limit, seed, groups, concept, ban, pairs, data, steps,
               guidance, size, batch_size, detector, threshold, progress
    Returns None on the non-main processes of a sharded (`accelerate launch`) run. A hardened `edit` is attacked
    on held-out targets only (`trce.attacks.held_out`).
    """
    import os

    from trce.attacks import ATTACKS, get_attack
    from trce.edit import as_edit

    # every argument is checked before any work, with the messages `trce attack` gives
    if not isinstance(suite, (str, os.PathLike)):
        raise TrceError(f"suite must be a suite name (see trce.suites()) or a suite YAML path, got {suite!r}",
                        field="suite")
    if not isinstance(attack, str):
        raise TrceError(f"attack must be the name of an attack ({', '.join(ATTACKS)}), got {attack!r}", field="attack")
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise TrceError(f"out must be a folder path, got {out!r}", field="out")
    mod = get_attack(attack)
    if not (budget is None or isinstance(budget, (mod.Budget, Mapping, str))
            or (isinstance(budget, (list, tuple)) and all(isinstance(b, str) for b in budget))):
        raise TrceError(f"budget must be a {mod.NAME} Budget, a mapping of its fields or 'key=value' text such as "
                        f"'restarts=2' or 'preset=NAME', got {type(budget).__name__} {budget!r}", field="budget")
    for name in options:
        if name not in {f.name for f in dataclasses.fields(AttackOptions)}:
            choose("attack option", name, [f.name for f in dataclasses.fields(AttackOptions)])
    opts = AttackOptions(**options)
    suite = os.fspath(suite)
    prepared = prepare(suite, attack, budget, opts)
    edit = as_edit(edit)
    if edit is not None:
        edit.check_applicable(pipe)  # another edit on the pipeline, another base model: refused now
    if out is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="trce-attack-") as tmp:
            return run_attack(pipe, suite, attack, edit, budget, Path(tmp) / "attack", reference, opts, {},
                        prepared=prepared)
    return run_attack(pipe, suite, attack, edit, budget, Path(out), reference, opts, {}, prepared=prepared)


def _original_latents(pipe, edit, budget, size):
    """target -> the original model's latents: the edit is taken off for the draw and put back."""
    from trce.attacks.unlearndiff import reference_latents

    def draw(target):
        edit.revert(pipe)
        try:
            return reference_latents(pipe, [target], steps=budget.reference_steps, guidance=budget.reference_guidance,
                                     images=budget.images, size=size)[0]
        finally:
            edit.apply(pipe, check_base=False)

    return draw


# --------------------------------------------------------------------------- the run
def run_attack(pipe, suite, attack_name, edit, budget, out: Path, reference, opts: AttackOptions, record: dict,
         prepared: dict | None = None, state=None) -> AttackResult | None:
    """The attack run in `out`, holding its lock (`io.run_lock`: a second run into `out` is refused); what `attack`
    and `trce attack` run once their inputs are checked (`prepared`: `prepare`'s result)."""
    from trce.families import family_of
    from trce.utils import io
    from trce.utils.processes import process_state

    folders.check(out, "attack")  # also a file where the folder goes
    io.check_writable(out, "out")
    if state is None:
        state = process_state(family_of(pipe).denoiser(pipe).device.type == "cpu")
    with io.run_lock(out, "out") if state.is_main_process else contextlib.nullcontext():
        return _attack(pipe, suite, attack_name, edit, budget, out, reference, opts, record, prepared, state)


def _attack(pipe, suite, attack_name, edit, budget, out: Path, reference, opts: AttackOptions, record: dict,
            prepared: dict | None, state) -> AttackResult | None:
    from trce.attacks.base import HELD_OUT_STREAM, AttackConfig
    from trce.attacks.budget import budget_key, restarts_of
    from trce.attacks.restart_judging import judge_restarts
    from trce.attacks.soft_prompt import placeholder
    from trce.edit import fingerprint
    from trce.eval.detectors import make_detector
    from trce.eval.prompts import PromptRow
    from trce.eval.rows import generate_rows
    from trce.families import family_of
    from trce.generate import check_settings, warn_long_prompts
    from trce.utils import io

    t0 = time.time()
    p = prepared or prepare(suite, attack_name, budget, opts)
    if "held_out" not in p:  # `trce attack` holds out before the model loads
        p = hold_out_targets(p, edit, state.is_main_process)
    held_out = p["held_out"]
    mod, budget, suite, targets, rows = p["mod"], p["budget"], p["suite"], p["targets"], p["rows"]
    settings, guidances, size = p["settings"], p["guidances"], p["size"]
    seeds = [t.seed for t in targets]
    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    check_settings(pipe, settings)
    if edit is not None:
        edit.check(pipe)  # a patch of another base model is refused before any search or image
    if state.is_main_process:
        warn_long_prompts(pipe, [t.prompt for t in targets])
    device = state.device if state.num_processes > 1 else denoiser.device
    attribute, values = (suite.attribute, suite.values) if suite.kind == "shapeworld" else (None, ())
    detector = make_detector(p["detector"], opts.threshold, attribute=attribute, values=values, device=str(device))
    model = getattr(pipe, "trce_model_name", None) or type(pipe).__name__
    reference_name = getattr(reference, "trce_model_name", None) if reference is not None else None
    key = {"model": model, "base": fingerprint(pipe)["id"], "patch": edit.digest() if edit is not None else None,
           "suite": f"{suite.name}@{suite.version}", "attack": mod.NAME, "budget": budget_key(budget),
           "seed": opts.seed, "banned": p["concept"]["banned"], "pairs": p["concept"].get("pairs_source"),
           "reference_model": reference_name, "steps": settings.steps, "size": size, "guidance": opts.guidance,
           "detector": detector.info(), "dtype": str(denoiser.dtype)}
    if held_out is not None:  # only for hardened patches: other run folders keep their keys
        key["held_out"] = {"dropped": held_out["dropped_indices"], "seed_stream": held_out["seed_stream"]}
    # which targets exist: a rerun with another --limit (or prompts) is refused, not mixed into these results
    key["targets"] = hashlib.sha256(json.dumps([[t.index, t.prompt, t.seed, g] for t, g in zip(targets, guidances)])
                                    .encode()).hexdigest()[:16]
    folders.claim(out, "attack", key, state)

    if mod.NEEDS_REFERENCE and reference is None:
        # the original model's images of the concept: the edit taken off for the draw, or the model itself
        reference = _original_latents(pipe, edit, budget, size) if edit is not None else pipe
    config = AttackConfig(budget=budget, seed=opts.seed, banned=p["banned"], pairs=p["pairs"], results=out / RESULTS,
                          size=size, stream=HELD_OUT_STREAM if held_out is not None else 0)
    restarts = restarts_of(budget)
    judged = {"judge": _judge(pipe, targets, rows, settings, detector)} if getattr(mod, "JUDGED", False) else {}
    with edit.applied(pipe) if edit is not None else contextlib.nullcontext():
        results = mod.attack(pipe, targets, config, reference=reference if mod.NEEDS_REFERENCE else None,
                             progress=opts.progress, **judged)
        reference = None  # the original model is not needed for the images
        before = generate_rows(pipe, rows, seeds, guidances, out / BEFORE, settings, detector, state,
                               progress=opts.progress, desc=f"before {suite.name}")
        if restarts == 1:
            after_rows = [PromptRow(prompt=r.prompt if mod.TYPED else placeholder(t.index), seed=t.seed,
                                    guidance=g, categories=row.categories, case_number=t.index,
                                    extra={**row.extra, "target_prompt": t.prompt})
                          for r, t, g, row in zip(results, targets, guidances, rows)]
            embeds = None if mod.TYPED else torch.stack([r.embeds["prompt_embeds"] for r in results])  # (N, L, D)
            after = generate_rows(pipe, after_rows, seeds, guidances, out, settings, detector, state,
                                  progress=opts.progress, desc=f"after {mod.NAME}", embeds=embeds)
        else:
            results, after = judge_restarts(pipe, mod, results, targets, guidances, rows, out, settings, detector,
                                            state, opts.progress)
    if not state.is_main_process:
        return None
    write_csv(out / CSV_NAME, results, targets, guidances, mod.TYPED, restarts > 1)
    metrics = run_metrics(model, edit, mod, budget, suite, targets, results, before, after, detector, settings,
                          size, family.image_size(pipe), denoiser, device, state, p["concept"], opts, out, t0,
                       {**record, "options": dataclasses.asdict(opts)}, held_out)
    io.write_json(out / "metrics.json", metrics)
    result = AttackResult(metrics)
    result.path = out / "metrics.json"
    result.results = results
    return result


def _judge(pipe, targets, rows, settings, detector):
    """judge(target, prompt) -> bool: the suite's detector's verdict on the image `trce eval` draws from `prompt` at
    the target's seed and guidance (the settings and detector of the run's before/after images)."""
    from trce.generate import generate_iter

    row_of = {t.index: row for t, row in zip(targets, rows)}

    def judge(target, prompt: str) -> bool:
        g = float(target.guidance if target.guidance is not None else settings.guidance)
        row = row_of.get(target.index)
        if row is not None:
            row = dataclasses.replace(row, prompt=prompt)
        ((_, images),) = list(generate_iter(pipe, [prompt], [target.seed], settings, [g], progress=False,
                                            desc="judge"))
        return detector.detect(images, [row] if row is not None else None)[0]["verdict"] is True

    return judge
