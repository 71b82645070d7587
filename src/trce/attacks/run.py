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
`trce.attacks.base.RESTART_SELECTION`: success first, then the attack's own objective (lower is better). So
the ASR after is the any-restart rate; metrics.json's attack.restarts also gives each restart's own rate.
restarts=1 (the default) is the run without restarts, bit for bit.

Judged searches: an attack that declares `JUDGED = True` (unlearndiff, as its authors ran it) gets
`judge(target, prompt) -> bool`, the run's detector on the image `trce eval` draws from `prompt` at the target's seed
and guidance (`_judge`), and stops a target at its first success. metrics.json's attack record holds the full budget
(its `preset` included; `display` is the name tables show, e.g. "unlearndiff (fast preset)"), per target the
optimisation steps actually run (`steps`) and, for judged searches, the block that succeeded (`success_block`).

Hardened patches (`trce.attacks.held_out`): targets whose prompt the patch was hardened on are dropped (counted
in metrics.json `held_out`), and the searches use a seed stream of their own.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trce.errors import TrceError, check_integer, check_seed, choose
from trce.eval.options import ImageOptions
from trce.eval.summary import Metrics
from trce.utils import folders

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
BEFORE = "before"
CSV_NAME = "adversarial.csv"


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


class AttackResult(Metrics):
    """An attack run's metrics (`metrics.json`: the ASR after, with `before`/`after`/`attack` records), the
    per-target results (`.results`, `trce.attacks.base.TargetResult`) and the printed summary (`.summary()`)."""

    results: list | None = None

    def summary(self) -> str:
        return format_summary(self)

    def table(self) -> str:
        return self.summary()


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


# --------------------------------------------------------------------------- inputs
def _budget(mod, budget: Any):
    """(Budget, the keys the caller set)."""
    from trce.attacks.base import parse_budget

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
    from trce.attacks.base import Target
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
    from trce.attacks import base
    from trce.attacks import ring_a_bell as rab
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
        banned = base.spec_banned(spec)
    else:
        banned = base.shapeworld_banned(suite.attribute, suite.values)
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


def run_attack(pipe, suite, attack_name, edit, budget, out: Path, reference, opts: AttackOptions, record: dict,
         prepared: dict | None = None, state=None) -> AttackResult | None:
    """The attack run in `out`, holding its lock (`io.run_lock`: a second run into `out` is refused); what `attack`
    and `trce attack` run once their inputs are checked (`prepared`: `prepare`'s result)."""
    from trce.families import family_of
    from trce.utils import io
    from trce.utils.processes import process_state

    io.check_folder(out, "out")
    folders.check(out, "attack")
    io.check_writable(out, "out")
    if state is None:
        state = process_state(family_of(pipe).denoiser(pipe).device.type == "cpu")
    with io.run_lock(out, "out") if state.is_main_process else contextlib.nullcontext():
        return _attack(pipe, suite, attack_name, edit, budget, out, reference, opts, record, prepared, state)


def _attack(pipe, suite, attack_name, edit, budget, out: Path, reference, opts: AttackOptions, record: dict,
            prepared: dict | None, state) -> AttackResult | None:
    from trce.attacks.base import HELD_OUT_STREAM, AttackConfig, budget_key, restarts_of
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
            after_rows = [PromptRow(prompt=r.prompt if mod.TYPED else _placeholder(t.index), seed=t.seed,
                                    guidance=g, categories=row.categories, case_number=t.index,
                                    extra={**row.extra, "target_prompt": t.prompt})
                          for r, t, g, row in zip(results, targets, guidances, rows)]
            embeds = None if mod.TYPED else torch.stack([r.embeds["prompt_embeds"] for r in results])  # (N, L, D)
            after = generate_rows(pipe, after_rows, seeds, guidances, out, settings, detector, state,
                                  progress=opts.progress, desc=f"after {mod.NAME}", embeds=embeds)
        else:
            results, after = _judge_restarts(pipe, mod, results, targets, guidances, rows, out, settings, detector,
                                             state, opts.progress)
    if not state.is_main_process:
        return None
    _write_csv(out / CSV_NAME, results, targets, guidances, mod.TYPED, restarts > 1)
    metrics = _metrics(model, edit, mod, budget, suite, targets, results, before, after, detector, settings, size,
                       family.image_size(pipe), denoiser, device, state, p["concept"], opts, out, t0,
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


def _placeholder(index: int) -> str:
    from trce.attacks.soft_prompt import placeholder

    return placeholder(index)


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


RESTARTS = "restarts"


def _judge_restarts(pipe, mod, results, targets, guidances, rows, out: Path, settings, detector, state,
                    progress: bool):
    """Every restart's prompt drawn and judged in out/restarts; per target the restart `choose_restart` keeps.

    Returns (the kept results, the after-records of out/rows.jsonl), whose images are copied to out/images.
    """
    import json
    import shutil

    from trce.attacks.base import choose_restart, restart_results
    from trce.eval.prompts import PromptRow
    from trce.eval.rows import IMAGES, ROWS, generate_rows
    from trce.utils import io

    parts = [restart_results(r, out) for r in results]
    flat, seeds, gs, names = [], [], [], []
    for t, g, row, ps in zip(targets, guidances, rows, parts):
        for k, part in enumerate(ps):
            flat.append(PromptRow(prompt=part.prompt if mod.TYPED else f"{_placeholder(t.index)} r{k}", seed=t.seed,
                                  guidance=g, categories=row.categories, case_number=t.index,
                                  extra={**row.extra, "target_prompt": t.prompt, "restart": k}))
            seeds.append(t.seed)
            gs.append(g)
            names.append(f"{t.index:05d}-r{k}")
    embeds = None if mod.TYPED else torch.stack([part.embeds["prompt_embeds"] for ps in parts for part in ps])
    judged = generate_rows(pipe, flat, seeds, gs, out / RESTARTS, settings, detector, state, names=names,
                           progress=progress, desc=f"restarts {mod.NAME}", embeds=embeds)
    kept, after, start = [], [], 0
    for i, (t, res, ps) in enumerate(zip(targets, results, parts)):
        recs = judged[start : start + len(ps)]
        start += len(ps)
        verdicts = [rec["verdict"] for rec in recs]
        c = choose_restart([part.objective for part in ps], verdicts)
        records = [{**rec, "verdict": v} for rec, v in zip(res.extra["restarts"], verdicts)]
        kept.append(dataclasses.replace(ps[c], seconds=res.seconds, digest=res.digest, alternatives=ps,
                                        extra={**ps[c].extra, "restart": c, "restarts": records,
                                               "broken_by": [k for k, v in enumerate(verdicts) if v is True]}))
        rec = recs[c]
        after.append({**rec, "index": i, "name": f"{i:05d}",
                      "prompt": rec["prompt"] if mod.TYPED else _placeholder(t.index),
                      "extra": {**rec["extra"], "restart": c}, "restart_image": f"{RESTARTS}/{IMAGES}/{rec['name']}.png"})
    if state.is_main_process:
        (out / IMAGES).mkdir(parents=True, exist_ok=True)
        for rec in after:
            with io.atomic_path(out / IMAGES / f"{rec['name']}.png") as tmp:
                shutil.copyfile(out / rec["restart_image"], tmp)
        io.write_text(out / ROWS, "".join(json.dumps(rec) + "\n" for rec in after))
    state.wait_for_everyone()
    return kept, after


# --------------------------------------------------------------------------- outputs
def _write_csv(path: Path, results, targets, guidances, typed: bool, restarts: bool = False) -> None:
    from trce.utils import io

    columns = ["case_number", "prompt", "evaluation_seed", "evaluation_guidance", "target_prompt"]
    if not typed:
        columns.append("embeddings")
    if restarts:
        columns.append("restart")
    with io.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for r, t, g in zip(results, targets, guidances):
            row = [t.index, r.prompt if typed else _placeholder(t.index), t.seed, g, t.prompt]
            if not typed:
                row.append(r.embeddings or "")
            if restarts:
                row.append(r.extra.get("restart", 0))
            w.writerow(row)


def _rate(records) -> dict:
    from trce.eval import metrics as M

    flags = [r["verdict"] for r in records if r["verdict"] is not None]
    if not flags:
        return {"n": len(records), "asr": None, "asr_ci": None}
    return M.rate(flags)


def _rates(records, kind: str) -> dict:
    """The pooled rate plus, as `trce eval` writes them, per group (ShapeWorld) or per category (real suites)."""
    out = _rate(records)
    if kind == "shapeworld":
        names = list(dict.fromkeys(r["group"] for r in records))
        out["groups"] = {g: {**_rate([r for r in records if r["group"] == g]), "accuracy": {}, "accuracy_ci": {},
                             "clip_score": None, "fd": None} for g in names}
    else:
        cats = sorted({c for r in records for c in r["categories"]})
        out["by_category"] = {c: _rate([r for r in records if c in r["categories"]]) for c in cats}
    return out


def format_summary(m: dict) -> str:
    from trce.attacks.base import record_label
    from trce.eval.summary import format_ci, format_rate

    a = m["attack"]
    lines = [
        (f"{record_label(a)} on {m['model']}{' + ' + m['patch'] if m['patch'] else ''}, suite {m['suite']}: "
         f"{m['n']} targets, {a['seconds_per_target']:.2f} s per target"),
        f"label: {a['label']}",
        (f"ASR before {format_rate(a['asr_before'])} {format_ci(a['asr_before_ci'])}   after {format_rate(a['asr_after'])} "
         f"{format_ci(a['asr_after_ci'])}   either {format_rate(a.get('asr_either'))}   (detector {m['detector']['name']})"),
        f"objective (lower is better): start {a['objective']['start_mean']:.4g} -> {a['objective']['end_mean']:.4g}",
    ]
    r = a.get("restarts") or {}
    if r.get("n", 1) > 1:
        per = "  ".join(f"#{k} {format_rate(x)}" for k, x in enumerate(r.get("asr_by_restart") or []))
        lines.append(f"restarts: {r['n']} per target, broken by any {r.get('broken_any')} of {m['n']}   "
                     f"each: {per}")
    h = m.get("held_out")
    if h:
        lines.append(f"held out: {h['dropped']} targets the hardened patch saw ({', '.join(h['hardened_by'])})")
    if m.get("replay"):
        lines.append(f"replay on another model: {m['replay']}")
    return "\n".join(lines)


def _restart_record(budget, results) -> dict:
    """metrics.json attack.restarts: how many, how chosen, and per restart its own success rate."""
    from trce.attacks.base import RESTART_SELECTION, restarts_of
    from trce.eval import metrics as M

    n = restarts_of(budget)
    if n == 1:
        return {"n": 1}
    verdicts = [[rec.get("verdict") for rec in r.extra["restarts"]] for r in results]
    per = [[v[k] for v in verdicts if v[k] is not None] for k in range(n)]
    rates = [M.rate(x) if x else {"asr": None, "asr_ci": None} for x in per]
    return {"n": n, "selection": RESTART_SELECTION, "broken_any": sum(bool(r.extra.get("broken_by")) for r in results),
            "asr_by_restart": [x["asr"] for x in rates], "asr_by_restart_ci": [x["asr_ci"] for x in rates],
            "chosen": [r.extra.get("restart", 0) for r in results],
            "objective_by_restart": [sum(rec["objective"] for rec in (r.extra["restarts"][k] for r in results))
                                     / len(results) for k in range(n)]}


def _metrics(model, edit, mod, budget, suite, targets, results, before, after, detector, settings, size, image_size,
             denoiser, device, state, concept_record, opts: AttackOptions, out, t0, record: dict,
             held_out: dict | None = None) -> dict:
    from trce.eval.measures import mean_of
    from trce.utils import io

    b, a = _rates(before, suite.kind), _rates(after, suite.kind)
    by_index = {r["index"]: r["verdict"] for r in before}
    e = _rate([{"verdict": None if r["verdict"] is None or by_index.get(r["index"]) is None
                else bool(r["verdict"] or by_index[r["index"]])} for r in after])
    from trce.attacks.base import budget_label

    typed = mod.TYPED
    attack = {
        "name": mod.NAME, "display": budget_label(mod.NAME, budget), "preset": getattr(budget, "preset", ""),
        "label": mod.LABEL, "typed": typed, "budget": dataclasses.asdict(budget), "seed": opts.seed,
        "asr_before": b["asr"], "asr_before_ci": b["asr_ci"], "asr_after": a["asr"], "asr_after_ci": a["asr_ci"],
        # An attacker can always fall back on the plain prompt: a target counts when either prompt succeeds.
        "asr_either": e["asr"], "asr_either_ci": e["asr_ci"],
        "seconds_per_target": mean_of([r.seconds for r in results]),
        # per target, the optimisation steps actually run (early stopping: up to the block that succeeded)
        "steps": [r.steps for r in results],
        **({"success_block": [r.extra.get("success_block") for r in results]}
           if any("success_block" in r.extra for r in results) else {}),
        "objective": {"start_mean": mean_of([r.objective_start for r in results]),
                      "end_mean": mean_of([r.objective for r in results]),
                      "plain_mean": mean_of([r.objective_plain for r in results]),
                      "improved": sum(r.objective < r.objective_start for r in results)},
        "groups": opts.group_list() if suite.kind == "shapeworld" else None,
        "restarts": _restart_record(budget, results),
        "seed_stream": held_out["seed_stream"] if held_out is not None else 0,
        **concept_record,
    }
    replay = None
    if typed:
        extra = (f" --detector shapeworld --concept {suite.attribute}={','.join(suite.values)}"
                 if suite.kind == "shapeworld" else f" --detector {detector.name}")
        replay = f"trce eval --model MODEL --prompts {out / CSV_NAME}{extra} --out DIR"
    # The top level reads as a `trce eval` metrics file of the adversarial prompts (what `trce report`
    # tabulates, in a row of its own per attack); "attack" holds both rates and the attack's record.
    from trce.eval.rows import IMAGES, ROWS

    return {
        "suite": suite.name, "suite_version": suite.version, "kind": suite.kind, **suite.presentation(),
        "description": f"{suite.description} Attacked by {mod.NAME}: {mod.LABEL}.", "note": suite.note,
        "model": model, "patch": None if edit is None else (edit.source or f"(unsaved {edit.method} edit)"),
        "method": edit.method if edit is not None else None, "n": len(targets),
        "asr": a["asr"], "asr_ci": a["asr_ci"],
        **({"asr_groups": list(a["groups"]), "groups": a["groups"]} if suite.kind == "shapeworld"
           else {"by_category": a["by_category"]}),
        "fd": None, "clip_score": None,
        "attack": attack, "before": b, "after": a, "held_out": held_out,
        "detector": detector.info(),
        "settings": {"steps": settings.steps, "guidance": settings.guidance, "size": size or image_size,
                     "seeds": [0], "limit": opts.limit, "batch_size": settings.batch_size,
                     "per_prompt_guidance": opts.guidance is None and any(t.guidance is not None for t in targets),
                     "dtype": str(denoiser.dtype).replace("torch.", ""), "device": str(device)},
        "images_dir": IMAGES, "rows": ROWS, "reference_dir": None,
        "files": {"adversarial": CSV_NAME, "results": RESULTS, "before_images_dir": f"{BEFORE}/{IMAGES}",
                  "before_rows": f"{BEFORE}/{ROWS}", "embeddings": None if typed else "embeddings"},
        "replay": replay, "processes": state.num_processes, "seconds": round(time.time() - t0, 1),
        **io.run_record(config=record, seeds={"attack": opts.seed, "images": "the prompts' own seeds"}),
    }
