"""`trce eval`: generate a suite's images at scale, judge them, and write `metrics.json`.

Output folder (`--out DIR`):

    DIR/trce.json                the folder's manifest (`trce.utils.folders`): kind "eval" and what the images
                                 depend on (model and patch fingerprints, steps, size, detector); a rerun with
                                 other values is refused instead of mixing, and so is a folder of another kind
    DIR/images/{index:05d}.png   one image per prompt row
    DIR/rows.jsonl               one JSON line per finished row: index, prompt, seed, guidance, group,
                                 categories, detector scores and verdict (appended and flushed per batch)
    DIR/reference/...            the original model's images and rows on the same prompts and seeds
                                 (ShapeWorld suites with a patch; real suites when FID is asked for)
    DIR/seeds/{s}/...            the same for each further `--seeds` offset
    DIR/metrics.json             the numbers (see `compute_metrics`) and the run record
    .DIR.lock (beside DIR)       while a run writes DIR; a second run into DIR is refused (`trce.utils.io.run_lock`)

Rerunning the same command resumes: rows whose line is in rows.jsonl and whose image exists are
skipped; a line cut short by a kill is dropped and its row redone, so no row is ever doubled. A rerun
that asks for other rows (`--limit` grown or shrunk) keeps the rows it still asks for, wherever they
now stand (matched by prompt, seed and guidance), draws the new ones and sets aside the rest in
DIR/.unused/ (taken back when asked for again): rows.jsonl and the metrics hold exactly the rows asked for.
Under `accelerate launch` (or `torchrun`) the unfinished rows are split across processes with
`PartialState.split_between_processes`; each rank appends to its own `rows.rank{r}.jsonl`, and
rank 0 merges the shards and computes the metrics after `wait_for_everyone`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from trce.errors import TrceError, choose
from trce.eval import metrics as M
from trce.eval.detectors import Detector, make_detector
from trce.eval.measures import compute_metrics
from trce.eval.options import EvalConfig, EvalOptions
from trce.eval.prompts import PromptRow, load_prompts
from trce.eval.reference import draw_reference
from trce.eval.rows import REFERENCE, generate_rows, offset_seed
from trce.eval.suites import Defaults, Suite, load_suite
from trce.eval.summary import Metrics
from trce.generate import GenSettings
from trce.utils import folders, io
from trce.utils.processes import process_state

log = logging.getLogger(__name__)


def _ad_hoc_suite(options: EvalOptions) -> Suite:
    path = Path(options.prompts)  # type: ignore[arg-type]
    return Suite(name=f"prompts:{path.name}", version="file", kind="real", description=f"prompts from {path}",
                 detector=options.detector or "nudenet", metrics=("asr", "by_category", "clip_score"),
                 defaults=Defaults(), file=str(path))


def _concept(options: EvalOptions, suite: Suite) -> tuple[str | None, tuple[str, ...]]:
    if suite.kind == "shapeworld":
        return suite.attribute, suite.values
    if options.concept is None:
        return None, ()
    from trce.shapeworld import world

    return world.attribute_values(options.concept, "concept")


@dataclass(frozen=True)
class _Plan:
    """An evaluation's suite, prompt rows and image settings, resolved before any model is loaded."""

    suite: Suite
    rows: list[PromptRow]
    settings: GenSettings
    steps: int
    size: int | None
    detector: Detector
    attribute: str | None
    values: tuple[str, ...]


def _plan(options: EvalOptions, device) -> _Plan:
    suite = load_suite(options.suite) if options.suite is not None else _ad_hoc_suite(options)
    if options.prompts is not None:
        rows = load_prompts(options.prompts)
        rows = rows[: options.limit] if options.limit is not None else rows
    else:
        if options.data is not None and suite.kind == "shapeworld":
            log.warning("data is ignored: ShapeWorld suites draw their prompts from vocab.yaml")
        rows = suite.rows(options.data, options.limit)
    d = suite.defaults
    steps = options.steps if options.steps is not None else d.steps
    size = options.size if options.size is not None else d.size
    settings = GenSettings(steps=steps, guidance=options.guidance if options.guidance is not None else d.guidance,
                           height=size, width=size, batch_size=options.batch_size or d.batch_size)
    name = options.detector or suite.detector
    attribute, values = _concept(options, suite)
    if name == "shapeworld" and attribute is None:
        raise TrceError("the shapeworld detector needs the erased concept: concept attribute=value (e.g. color=red)",
                        field="concept")
    detector = make_detector(name, options.threshold, attribute=attribute, values=values,
                             q16_weights=options.q16_weights, device=str(device))
    return _Plan(suite, rows, settings, steps, size, detector, attribute, values)


def evaluate(pipe, suite: str | None = None, *, edit=None, out: str | Path | None = None, limit: int | None = None,
             seeds=(0,), **options) -> Metrics | None:
    """Evaluate `pipe` (with `edit` applied for the duration, when given) on a suite; returns the metrics.

    suite    a built-in suite name (`trce.suites()`) or a suite YAML path; or `prompts=FILE` instead
    edit     an `Edit` (from `trce.erase` or `trce.load_patch`) or a patch folder; the pipeline is left as it was
    out      the run folder (images, rows.jsonl, metrics.json); rerunning into it resumes. None: a
             temporary folder, removed afterwards (the metrics are returned)
    limit    prompts per group (ShapeWorld) or in all (real suites); seeds: seed offsets (0: the suite's own)
    options  any field of `EvalOptions`: steps, guidance, size, batch_size, detector, threshold, data,
             concept, reference_cache, hidden_prompt, clip_weights, inception_weights, q16_weights, progress
    Returns None on the non-main processes of a sharded (`accelerate launch`) run.
    """
    from collections.abc import Iterable

    from trce.edit import as_edit

    known = {f.name for f in fields(EvalOptions)}
    for name in options:
        if name not in known:
            choose("evaluate option", name, known)
    # every argument is checked before any work, with the messages `trce eval` gives
    for name, value, want in (("suite", suite, "a suite name (see trce.suites()) or a suite YAML path"),
                              ("prompts", options.get("prompts"), "a prompt file path"), ("out", out, "a folder path")):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise TrceError(f"{name} must be {want}, got {value!r}", field=name)
    seeds = tuple(seeds) if isinstance(seeds, Iterable) and not isinstance(seeds, (str, bytes)) else (seeds,)
    opts = EvalOptions(suite=None if suite is None else os.fspath(suite), limit=limit, seeds=seeds, **options)
    edit = as_edit(edit)
    if edit is not None:
        edit.check_applicable(pipe)  # another edit on the pipeline, another base model: refused now
    if opts.hidden_prompt and edit is None:
        raise TrceError("hidden_prompt needs an edit (a KPOP patch)", field="hidden_prompt")
    if out is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="trce-eval-") as tmp:
            return _run(pipe, edit, opts, Path(tmp) / "eval", None, record={"options": asdict(opts)})
    return _run(pipe, edit, opts, Path(out), None, record={"options": asdict(opts)})


def run_eval(config: EvalConfig, out: str | Path) -> Metrics | None:
    """`trce eval`: load the model (and the patch) named in `config`, then `evaluate` into `out`.

    Inputs are checked before the model is loaded: the output folders, the suite and its prompts, the patch.
    """
    from trce.edit import load_patch
    from trce.loading import load_pipeline, resolve_device

    out = Path(out)
    options = _check_folders(out, config.options())
    cpu = config.device == "cpu" or not torch.cuda.is_available()
    state = process_state(cpu)
    device = state.device if state.num_processes > 1 else resolve_device(config.device)
    plan = _plan(options, device)
    with _locked(out, state):  # a second run into `out` is refused here, before its model loads
        edit = load_patch(config.patch) if config.patch is not None else None
        pipe = load_pipeline(config.model, device=device, dtype=config.dtype)
        return _run(pipe, edit, options, out, plan, record={**asdict(config), "out": str(out)}, state=state)


def _check_folders(out: Path, options: EvalOptions) -> EvalOptions:
    """Refuse an output folder that cannot be written before any work; a reference cache that cannot be written is
    left out (one log line) and the original model's images are drawn into `out`."""
    folders.check(out, "eval")  # also a file where the folder goes (`io.check_folder`'s message)
    io.check_folder(options.reference_cache, "reference_cache")
    io.check_writable(out, "out")
    if options.reference_cache is not None:
        # the cache is shared by runs: never a run's own folder, nor inside one (its command owns all of it)
        folders.check_outside(options.reference_cache, "reference_cache")
        kind = folders.kind_of(options.reference_cache)
        if kind is not None:
            raise TrceError(f"reference_cache {options.reference_cache} is a trce {kind} folder, not a cache; choose "
                            "another folder", field="reference_cache")
        problem = io.usable_folder(options.reference_cache)
        if problem is not None:
            log.warning("reference cache %s cannot be used (%s); drawing the original model's images into %s "
                        "without it", options.reference_cache, problem, out)
            options = dataclasses.replace(options, reference_cache=None)
    return options


def _locked(out: Path, state):
    """`out`'s lock (`io.run_lock`), held by the main process of a run."""
    return io.run_lock(out, "out") if state.is_main_process else contextlib.nullcontext()


def _run(pipe, edit, options: EvalOptions, out: Path, plan: _Plan | None, record: dict, state=None) -> Metrics | None:
    from trce.families import family_of

    options = _check_folders(out, options)
    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    if state is None:
        state = process_state(denoiser.device.type == "cpu")
    device = state.device if state.num_processes > 1 else denoiser.device
    plan = plan or _plan(options, device)
    with _locked(out, state):
        return _evaluate(pipe, edit, options, out, plan, record, state, device)


def _evaluate(pipe, edit, options: EvalOptions, out: Path, plan: _Plan, record: dict, state, device) -> Metrics | None:
    from trce.edit import fingerprint
    from trce.families import family_of
    from trce.generate import check_settings, warn_long_prompts

    t0 = time.time()
    suite, rows, settings = plan.suite, plan.rows, plan.settings
    family = family_of(pipe)
    denoiser = family.denoiser(pipe)
    detector = plan.detector
    check_settings(pipe, settings)
    if edit is not None:
        edit.check(pipe)  # a patch of another base model is refused before any image is drawn
    base = fingerprint(pipe)
    if edit is not None and options.hidden_prompt:
        from trce.prompt_injection import hidden_prompt

        hidden_prompt(edit)  # a patch without one fails here, before any image
    model = getattr(pipe, "trce_model_name", None) or type(pipe).__name__
    patch = None if edit is None else (edit.source or f"(unsaved {edit.method} edit)")
    key = {"model": model, "base": base["id"], "patch": edit.digest() if edit is not None else None,
           "steps": plan.steps, "size": plan.size, "guidance": options.guidance, "suite": f"{suite.name}@{suite.version}",
           "detector": detector.info(), "dtype": str(denoiser.dtype),
           **({"hidden_prompt": True} if options.hidden_prompt else {})}
    folders.claim(out, "eval", key, state)
    if state.is_main_process:
        warn_long_prompts(pipe, [r.prompt for r in rows])

    d = suite.defaults
    base_seeds = [r.seed if r.seed is not None else d.seed + i for i, r in enumerate(rows)]
    guidances = [float(options.guidance if options.guidance is not None else r.guidance if r.guidance is not None
                       else settings.guidance) for r in rows]
    inception = M.Inception(options.inception_weights, device) if options.inception_weights else None
    # the original model's images: for ShapeWorld's fd always, for a real suite's FID when it can be computed
    need_reference = edit is not None and (suite.kind == "shapeworld" or options.reference
                                           or (suite.kind == "real" and inception is not None))
    runs = []
    for k, offset in enumerate(options.seeds):
        run_dir = out if k == 0 else out / "seeds" / str(offset)
        seeds = [offset_seed(s, offset) for s in base_seeds]
        ref_records = None
        if need_reference:
            ref_records = draw_reference(pipe, rows, seeds, guidances, run_dir / REFERENCE, settings, detector, state,
                                     options, suite, key)
        if edit is None and options.reference_cache is not None:
            # the original model's own evaluation is the reference of every patch: draw it once, in the shared cache
            records = draw_reference(pipe, rows, seeds, guidances, run_dir, settings, detector, state, options, suite, key)
            runs.append((offset, run_dir, records, None))
            continue
        with contextlib.ExitStack() as ctx:
            if edit is not None:
                ctx.enter_context(edit.applied(pipe))
            if options.hidden_prompt:
                from trce.prompt_injection import hidden_prompt_installed

                ctx.enter_context(hidden_prompt_installed(pipe, edit))
            desc = f"eval {suite.name}" + (f" seed+{offset}" if len(options.seeds) > 1 else "")
            records = generate_rows(pipe, rows, seeds, guidances, run_dir, settings, detector, state,
                                    progress=options.progress, desc=desc)
        runs.append((offset, run_dir, records, ref_records))
    if not state.is_main_process:
        return None
    settings_record = {
        "steps": plan.steps, "guidance": settings.guidance, "size": plan.size or family.image_size(pipe),
        "seeds": list(options.seeds), "limit": options.limit, "batch_size": settings.batch_size,
        # True when rows use the prompt file's own guidance (I2P, P4D) and `guidance` is only the fallback
        "per_prompt_guidance": options.guidance is None and any(r.guidance is not None for r in rows),
        "dtype": str(denoiser.dtype).replace("torch.", ""), "device": str(device),
    }
    result = compute_metrics(suite, runs, out, detector, options, settings_record, inception, device)
    result.update({
        "model": model, "patch": patch, "method": edit.method if edit is not None else None,
        **({"stages": edit.settings.get("stages")} if edit is not None and edit.settings.get("stages") else {}),
        **({"hidden_prompt": True} if options.hidden_prompt else {}),
        "base_fingerprint": base["id"], "processes": state.num_processes, "seconds": round(time.time() - t0, 1),
    })
    ordered = {k: result[k] for k in _KEY_ORDER if k in result} | {k: v for k, v in result.items() if k not in _KEY_ORDER}
    metrics = Metrics({**ordered, **io.run_record(config=record, seeds=list(options.seeds))})
    io.write_json(out / "metrics.json", metrics)
    metrics.path = out / "metrics.json"
    return metrics


_KEY_ORDER = ("suite", "suite_version", "kind", "description", "note", "model", "patch", "method", "stages",
              "hidden_prompt",
              "n", "asr",
              "asr_ci", "asr_groups", "by_category", "groups", "fd", "fd_features", "fd_note", "fid", "fid_note", "clip_score",
              "clip_score_note", "esr", "esr_ci", "psr", "psr_ci", "reference", "detector", "settings", "per_seed",
              "asr_mean", "asr_std", "images_dir", "rows", "reference_dir")
