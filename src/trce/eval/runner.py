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
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from trce.errors import TrceError, choose
from trce.eval import metrics as M
from trce.eval import resume
from trce.eval.detectors import Detector, make_detector
from trce.eval.prompts import PromptRow, load_prompts
from trce.eval.suites import ERASURE_GROUPS, Defaults, Suite, load_suite
from trce.generate import GenSettings, generate_iter
from trce.utils import folders, io
from trce.utils.processes import SingleState, process_state
from trce.utils.records import Records

log = logging.getLogger(__name__)

ROWS = "rows.jsonl"
IMAGES = "images"
REFERENCE = "reference"


@dataclass(frozen=True)
class ImageOptions:
    """How images are drawn and judged (None: the suite's defaults): what `trce.evaluate` and `trce.attack` share."""

    steps: int | None = None
    guidance: float | None = None  # when set, overrides the prompt file's per-prompt guidance
    size: int | None = None
    batch_size: int | None = None
    detector: str | None = None
    threshold: float | None = None

    def __post_init__(self) -> None:
        import math

        from trce.generate import check_count, check_guidance, check_size

        for name in ("steps", "batch_size"):
            if getattr(self, name) is not None:
                check_count(getattr(self, name), name)
        if self.guidance is not None:
            check_guidance(self.guidance)
        check_size(self.size)
        if self.threshold is not None and (isinstance(self.threshold, bool)
                                           or not isinstance(self.threshold, (int, float))
                                           or not math.isfinite(self.threshold)):
            raise TrceError(f"threshold must be a finite number, got {self.threshold!r}", field="threshold")


@dataclass(frozen=True)
class EvalOptions(ImageOptions):
    """What an evaluation depends on besides the model and the edit (`trce.evaluate`'s keyword arguments)."""

    suite: str | None = None  # a built-in suite name or a suite YAML path
    prompts: str | None = None  # instead of a suite: any prompt file (every layout of trce.eval.prompts)
    data: str | None = None
    limit: int | None = None  # rows of a real suite; rows per group of a ShapeWorld suite
    seeds: tuple[int, ...] = (0,)  # seed offsets; 0 keeps the suite's own seeds
    concept: str | None = None  # "attribute=value[,value]" for the shapeworld detector outside ShapeWorld suites
    clip_weights: str | None = None
    inception_weights: str | None = None
    q16_weights: str | None = None
    reference: bool = False  # also generate the original model's images for a real suite
    reference_cache: str | None = None  # share reference images between runs (keyed by base model + settings)
    hidden_prompt: bool = False  # draw with the KPOP patch's hidden prompt injected (the recovery check, Fig. 6)
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if (self.suite is None) == (self.prompts is None):
            raise TrceError("give exactly one of suite and prompts (a prompt file)", field="suite")
        if self.prompts is not None:
            path = Path(self.prompts).expanduser()
            if path.is_dir():
                raise TrceError(f"prompts {self.prompts} is a folder, not a prompt file (a CSV or TXT file)",
                                field="prompts")
            if not path.exists():
                raise TrceError(f"prompts {self.prompts} does not exist", field="prompts")
        if not self.seeds:
            raise TrceError("seeds needs at least one seed offset", field="seeds")
        if any(isinstance(s, bool) or not isinstance(s, int) for s in self.seeds):
            raise TrceError(f"seeds must be integers, got {self.seeds!r}", field="seeds")
        if len(set(self.seeds)) != len(self.seeds):
            raise TrceError(f"seeds has repeated values: {','.join(map(str, self.seeds))}", field="seeds")
        if any(s < 0 for s in self.seeds):
            raise TrceError(f"seeds must be non-negative, got {','.join(map(str, self.seeds))}", field="seeds")
        if self.limit is not None:
            from trce.generate import check_count

            check_count(self.limit, "limit")


@dataclass(frozen=True)
class EvalConfig(EvalOptions):
    """`trce eval`'s inputs: the options plus the model and patch to load (`run_eval`)."""

    model: str = "shapeworld"
    patch: str | None = None
    device: str | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.hidden_prompt and self.patch is None:
            raise TrceError("hidden_prompt needs a patch (a KPOP patch)", field="hidden_prompt")

    def options(self) -> EvalOptions:
        return EvalOptions(**{f.name: getattr(self, f.name) for f in fields(EvalOptions)})


class Metrics(dict):
    """`metrics.json` as a dict, with the table `trce eval` prints (`.table()`) and where it was written (`.path`)."""

    path: Path | None = None

    @property
    def asr(self) -> float | None:
        return self.get("asr")

    def table(self) -> str:
        return format_table(self)


def offset_seed(seed: int, offset: int) -> int:
    """The seed of a row under seed offset `offset`: its own for 0, else a hash of (seed, offset).

    Hashing (not seed + offset) keeps repeats independent: consecutive rows often have consecutive
    seeds, and a shifted seed would reuse a neighbour's initial noise.
    """
    if offset == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(offset)]).generate_state(1, dtype=np.uint32)[0])


# --------------------------------------------------------------------------- rows on disk
def _matches(rec: dict | None, row: PromptRow, seed: int, guidance: float, folder: Path) -> bool:
    return (rec is not None and rec.get("prompt") == row.prompt and rec.get("seed") == seed
            and rec.get("guidance") == guidance and (folder / IMAGES / f"{rec['name']}.png").exists())


def _record(index: int, name: str, row: PromptRow, seed: int, guidance: float, result: dict) -> dict:
    """A finished row's record; `result` holds the detector's verdict and scores."""
    return {"index": index, "name": name, "prompt": row.prompt, "seed": seed, "guidance": guidance,
            "group": row.category, "categories": list(row.categories), "case_number": row.case_number,
            "verdict": result["verdict"], "scores": result["scores"], "extra": row.extra}


def generate_rows(pipe, rows: Sequence[PromptRow], seeds: Sequence[int], guidances: Sequence[float], folder: Path,
                  settings: GenSettings, detector: Detector, state=None, names: Sequence[str] | None = None,
                  progress: bool = True, desc: str = "eval", embeds: torch.Tensor | None = None) -> list[dict]:
    """Generate, judge and record every row not already finished in `folder`; returns the records in row order.

    Images go to folder/images/{name}.png (name defaults to the zero-padded row index), records to
    folder/rows.jsonl (`trce.utils.records`: appended and fsynced per batch, sharded over processes). With
    `embeds` ((N, L, D) conditionings: soft prompts) the images are drawn from them, not from the rows' text.
    """
    state = state if state is not None else SingleState()
    by_index = names is None  # rows named by their index: a rerun asking for other rows moves them (`resume`)
    names = list(names) if names is not None else [f"{i:05d}" for i in range(len(rows))]
    folder = Path(folder)
    records = Records(folder / ROWS, "name", state, order=lambda r: (r.get("index", 0), r["name"]))
    if state.is_main_process:
        (folder / IMAGES).mkdir(parents=True, exist_ok=True)
        if by_index:
            def remake(i: int, rec: dict) -> dict:
                return {**rec, **_record(i, names[i], rows[i], seeds[i], guidances[i], rec)}

            resume.reconcile(folder, [resume.identity(r.prompt, s, g) for r, s, g in zip(rows, seeds, guidances)],
                             names, IMAGES, ROWS, remake)
    done = records.done()
    todo = [i for i in range(len(rows)) if not _matches(done.get(names[i]), rows[i], seeds[i], guidances[i], folder)]
    if len(todo) < len(rows) and state.is_main_process:
        log.info("%s: %d of %d rows already done, generating %d", folder, len(rows) - len(todo), len(rows), len(todo))
    with state.split_between_processes(todo) as mine, records.appender() as append:
        if mine:
            batches = generate_iter(pipe, [rows[i].prompt for i in mine], [seeds[i] for i in mine], settings,
                                    [guidances[i] for i in mine], progress=progress and state.is_main_process,
                                    desc=desc, embeds=embeds[mine] if embeds is not None else None)
            for local, images in batches:
                idx = [mine[j] for j in local]
                results = detector.detect(images, [rows[i] for i in idx])
                for i, img in zip(idx, images):
                    io.save_png(folder / IMAGES / f"{names[i]}.png", img)
                append([_record(i, names[i], rows[i], seeds[i], guidances[i], res) for i, res in zip(idx, results)])
    by_name = records.collect()
    missing = [names[i] for i in range(len(rows)) if names[i] not in by_name]
    if missing:
        raise TrceError(f"{folder}: rows {', '.join(missing[:5])} were not written; rerun the same command to finish")
    return [by_name[n] for n in names]


# --------------------------------------------------------------------------- the run
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
    io.check_folder(out, "out")
    io.check_folder(options.reference_cache, "reference_cache")
    folders.check(out, "eval")
    io.check_writable(out, "out")
    if options.reference_cache is not None:
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
            ref_records = _reference(pipe, rows, seeds, guidances, run_dir / REFERENCE, settings, detector, state,
                                     options, suite, key)
        if edit is None and options.reference_cache is not None:
            # the original model's own evaluation is the reference of every patch: draw it once, in the shared cache
            records = _reference(pipe, rows, seeds, guidances, run_dir, settings, detector, state, options, suite, key)
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


def _reference(pipe, rows, seeds, guidances, ref_dir: Path, settings, detector, state, config: EvalOptions,
               suite: Suite, key: dict) -> list[dict]:
    """The original model's rows in ref_dir (images/ and rows.jsonl), generated there or linked from the shared
    cache (`reference_cache`, generated there once)."""
    if config.reference_cache is None:
        return generate_rows(pipe, rows, seeds, guidances, ref_dir, settings, detector, state,
                             progress=config.progress, desc=f"reference {suite.name}")
    ckey = {k: key[k] for k in ("base", "steps", "size", "suite", "detector", "dtype")}
    digest = hashlib.sha256(json.dumps(ckey, sort_keys=True, default=str).encode()).hexdigest()[:16]
    cache = Path(config.reference_cache).expanduser() / f"{suite.name}-{digest}"
    names = [hashlib.sha1(f"{r.prompt}\0{s}\0{g}".encode()).hexdigest()[:20] for r, s, g in zip(rows, seeds, guidances)]
    # runs sharing the cache draw into it one at a time (a later one finds the images drawn)
    with io.run_lock(cache, "reference_cache", wait=True) if state.is_main_process else contextlib.nullcontext():
        cached = generate_rows(pipe, rows, seeds, guidances, cache, settings, detector, state, names=names,
                               progress=config.progress, desc=f"reference {suite.name}")
    if state.is_main_process:
        (ref_dir / IMAGES).mkdir(parents=True, exist_ok=True)
        recs = []
        for i, rec in enumerate(cached):
            dst = ref_dir / IMAGES / f"{i:05d}.png"
            src = cache / IMAGES / f"{rec['name']}.png"
            if dst.exists():
                dst.unlink()
            try:
                os.link(src, dst)
            except OSError:
                import shutil

                shutil.copyfile(src, dst)
            recs.append({**rec, "index": i, "name": f"{i:05d}"})
        io.write_text(ref_dir / ROWS, "".join(json.dumps(r) + "\n" for r in recs))
        io.write_json(ref_dir / "cache.json", {"cache": str(cache), "key": ckey})
    state.wait_for_everyone()
    return [{**rec, "index": i, "name": f"{i:05d}"} for i, rec in enumerate(cached)]


# --------------------------------------------------------------------------- metrics
def _images(folder: Path, records: Sequence[dict], chunk: int = 256) -> Iterator[np.ndarray]:
    from PIL import Image

    for s in range(0, len(records), chunk):
        yield np.stack([np.asarray(Image.open(folder / IMAGES / f"{r['name']}.png").convert("RGB"))
                        for r in records[s : s + chunk]])


def _features(folder: Path, records: Sequence[dict], fn) -> np.ndarray:
    parts = [fn(batch) for batch in _images(folder, records)]
    return np.concatenate(parts) if parts else np.zeros((0, 1))


def _verdict_rate(records: Sequence[dict]) -> dict:
    flags = [r["verdict"] for r in records if r["verdict"] is not None]
    if not flags and records:
        return {"n": len(records), "asr": None, "asr_ci": None}
    return M.rate(flags)


def _accuracy(records: Sequence[dict]) -> tuple[dict, dict]:
    """Detector top-1 == the prompt's value, per attribute the prompts name."""
    from trce.shapeworld import world

    acc, ci = {}, {}
    for attr in world.ATTRIBUTES:
        flags = [r["scores"]["top1"][attr] == r["extra"]["named"][attr] for r in records
                 if attr in r["extra"].get("named", {}) and "top1" in r["scores"]]
        if flags:
            acc[attr] = sum(flags) / len(flags)
            ci[attr] = M.wilson(sum(flags), len(flags))
    return acc, ci


def _fd(a: np.ndarray, b: np.ndarray) -> float | None:
    return M.frechet_from_features(a, b) if len(a) >= 2 and len(b) >= 2 else None


def _shapeworld_numbers(suite: Suite, records: list[dict], folder: Path, ref_records, ref_folder, cache: dict) -> dict:
    """Per-group rate, accuracy, CLIP score and Fréchet distance of one seed's rows."""
    groups = {}
    emb = cache["vision"](folder, records)
    txt = cache["text"]([r["prompt"] for r in records])
    scores = M.clip_score(emb, txt)
    ref_emb = cache["vision"](ref_folder, ref_records) if ref_records is not None else None
    for g in suite.groups:
        sel = [i for i, r in enumerate(records) if r["group"] == g]
        recs = [records[i] for i in sel]
        acc, acc_ci = _accuracy(recs)
        groups[g] = {**_verdict_rate(recs), "accuracy": acc, "accuracy_ci": acc_ci,
                     "clip_score": float(scores[sel].mean()) if sel else None,
                     "fd": _fd(emb[sel], ref_emb[sel]) if ref_emb is not None else None}
    pooled = [r for r in records if r["group"] in ERASURE_GROUPS]
    head = _verdict_rate(pooled)
    out = {"n": len(records), "asr": head["asr"], "asr_ci": head["asr_ci"], "groups": groups,
           "fd": _fd(emb, ref_emb) if ref_emb is not None else None, "clip_score": float(scores.mean())}
    if len(suite.values) > 1 and all("top1" in r["scores"] for r in records):
        rows = [r for r in records if r["extra"].get("value") is not None]
        out.update(M.esr_psr([r["extra"]["value"] for r in rows],
                             [r["scores"]["top1"][suite.attribute] for r in rows], suite.values))
    return out


def _real_numbers(suite: Suite, records: list[dict], folder: Path, ref_records, ref_folder, cache: dict) -> dict:
    head = _verdict_rate(records)
    by_cat: dict[str, list[dict]] = {}
    for r in records:
        for c in r["categories"]:
            by_cat.setdefault(c, []).append(r)
    out = {"n": len(records), "asr": head["asr"], "asr_ci": head["asr_ci"],
           "by_category": {c: _verdict_rate(rs) for c, rs in sorted(by_cat.items())}, "fd": None, "clip_score": None}
    if cache.get("clip") is not None:
        scores = M.clip_score(_features(folder, records, cache["clip"].image_embeds),
                              cache["clip"].text_embeds([r["prompt"] for r in records]))
        out["clip_score"] = float(scores.mean())
        for c in by_cat:
            idx = [i for i, r in enumerate(records) if c in r["categories"]]
            out["by_category"][c]["clip_score"] = float(scores[idx].mean())
    if cache.get("inception") is not None and ref_records is not None:
        out["fd"] = _fd(_features(folder, records, cache["inception"].features),
                        _features(ref_folder, ref_records, cache["inception"].features))
    return out


def compute_metrics(suite: Suite, runs, out: Path, detector: Detector, config: EvalOptions, settings_record: dict,
                    inception, device) -> dict:
    """metrics.json's numbers from each seed offset's records (see the module docstring for the layout)."""
    cache: dict = {"inception": inception}
    if suite.kind == "shapeworld":
        from trce.shapeworld import clip_vision

        vision = clip_vision(device="cpu")
        cache["vision_dim"] = vision.config.projection_dim
        cache["vision"] = lambda folder, recs: _features(folder, recs, lambda x: M.shapeworld_image_embeds(x, vision))
        text_cache: dict[str, np.ndarray] = {}

        def text(prompts):
            missing = sorted(set(prompts) - set(text_cache))
            if missing:
                text_cache.update(zip(missing, M.shapeworld_text_embeds(missing)))
            return np.stack([text_cache[p] for p in prompts])

        cache["text"] = text
        numbers = _shapeworld_numbers
    else:
        cache["clip"] = M.RealClip(config.clip_weights, device) if config.clip_weights else None
        numbers = _real_numbers
    per_seed = []
    for offset, run_dir, records, ref_records in runs:
        ref_dir = run_dir / REFERENCE if ref_records is not None else None
        entry = numbers(suite, records, run_dir, ref_records, ref_dir, cache)
        if ref_records is not None:
            ref = numbers(suite, ref_records, ref_dir, None, None, cache)
            entry["reference"] = {k: v for k, v in ref.items() if k not in ("fd",)}
        rel = run_dir.relative_to(out)
        entry |= {"seed_offset": offset, "images_dir": str(rel / IMAGES), "rows": str(rel / ROWS),
                  "reference_dir": str(rel / REFERENCE / IMAGES) if ref_records is not None else None}
        per_seed.append(entry)

    # Pooled over seed offsets: rates from all images together (their Wilson interval), image-set
    # metrics (fd, CLIP score) as the mean of the per-seed values.
    all_records = [r for _, _, recs, _ in runs for r in recs]
    first = per_seed[0]
    result: dict = {"suite": suite.name, "suite_version": suite.version, "kind": suite.kind,
                    "description": suite.description, "note": suite.note}
    result |= suite.presentation()  # suite_label, suite_group, suite_order: how `trce report` shows the suite
    if suite.kind == "shapeworld":
        pooled = _pool_shapeworld(suite, per_seed, all_records)
        result |= pooled
        result["asr_groups"] = [g for g in suite.groups if g in ERASURE_GROUPS]
        result["fd_features"] = "ShapeWorld CLIP vision tower image_embeds"
        dim = cache["vision_dim"]
        smallest = min(len([r for r in runs[0][2] if r["group"] == g]) for g in suite.groups)
        if result["fd"] is not None and smallest <= dim:
            result["fd_note"] = (f"{smallest} images per group for {dim}-d features: the covariances are "
                                 "rank-deficient and fd is biased upwards; compare fd only at equal n")
            log.info("fd: %s", result["fd_note"])
    else:
        head = _verdict_rate(all_records)
        by_cat: dict[str, list[dict]] = {}
        for r in all_records:
            for c in r["categories"]:
                by_cat.setdefault(c, []).append(r)
        result |= {"n": len(all_records), "asr": head["asr"], "asr_ci": head["asr_ci"],
                   "by_category": {c: _verdict_rate(rs) for c, rs in sorted(by_cat.items())}}
        for c in result["by_category"]:
            vals = [p["by_category"][c].get("clip_score") for p in per_seed if c in p["by_category"]]
            if vals and all(v is not None for v in vals):
                result["by_category"][c]["clip_score"] = float(np.mean(vals))
        result["fd"] = mean_of([p["fd"] for p in per_seed])
        result["fid"] = result["fd"]
        result["fd_features"] = "Inception-v3 pool (2048-d)" if inception is not None else None
        if "fid" in suite.metrics or config.inception_weights:
            if inception is None:
                result["fid_note"] = "FID unavailable: no Inception weights (--inception-weights FILE)"
            elif not runs[0][3]:
                result["fid_note"] = "FID needs a patch: the original model is its own reference"
        result["clip_score"] = mean_of([p["clip_score"] for p in per_seed])
        if result["clip_score"] is None and "clip_score" in suite.metrics:
            result["clip_score_note"] = "CLIP score unavailable: no CLIP weights (--clip-weights DIR)"
        if first.get("reference") is not None:
            result["reference"] = {"n": len(runs[0][3]), **_verdict_rate([r for *_, refs in runs for r in refs])}
    result["detector"] = {**detector.info(), **detector.summary(all_records)}
    result["settings"] = settings_record
    if len(per_seed) > 1:
        result["per_seed"] = per_seed
        asrs = [p["asr"] for p in per_seed if p["asr"] is not None]
        if asrs:
            result["asr_mean"], result["asr_std"] = float(np.mean(asrs)), float(np.std(asrs, ddof=1))
    result |= {"images_dir": first["images_dir"], "rows": first["rows"], "reference_dir": first["reference_dir"]}
    return result


def mean_of(values) -> float | None:
    """The mean of the values that are not None (None when there are none)."""
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _pool_shapeworld(suite: Suite, per_seed: list[dict], records: list[dict]) -> dict:
    groups = {}
    for g in suite.groups:
        recs = [r for r in records if r["group"] == g]
        acc, acc_ci = _accuracy(recs)
        groups[g] = {**_verdict_rate(recs), "accuracy": acc, "accuracy_ci": acc_ci,
                     "clip_score": mean_of([p["groups"][g]["clip_score"] for p in per_seed]),
                     "fd": mean_of([p["groups"][g]["fd"] for p in per_seed])}
    head = _verdict_rate([r for r in records if r["group"] in ERASURE_GROUPS])
    out = {"n": len(records), "asr": head["asr"], "asr_ci": head["asr_ci"], "groups": groups,
           "fd": mean_of([p["fd"] for p in per_seed]), "clip_score": mean_of([p["clip_score"] for p in per_seed])}
    if "esr" in per_seed[0]:
        rows = [r for r in records if r["extra"].get("value") is not None]
        out.update(M.esr_psr([r["extra"]["value"] for r in rows],
                             [r["scores"]["top1"][suite.attribute] for r in rows], suite.values))
    if per_seed[0].get("reference") is not None:
        ref = per_seed[0]["reference"]
        if len(per_seed) > 1:  # pool the reference's rates too
            ref = {"asr": mean_of([p["reference"]["asr"] for p in per_seed]),
                   "groups": {g: {"asr": mean_of([p["reference"]["groups"][g]["asr"] for p in per_seed]),
                                  "accuracy": {a: mean_of([p["reference"]["groups"][g]["accuracy"].get(a)
                                                         for p in per_seed])
                                               for a in per_seed[0]["reference"]["groups"][g]["accuracy"]}}
                              for g in suite.groups},
                   "clip_score": mean_of([p["reference"]["clip_score"] for p in per_seed])}
        out["reference"] = ref
    return out


# --------------------------------------------------------------------------- printing
def format_rate(x) -> str:
    """A fraction as a right-aligned percentage for the printed tables ("-" for None)."""
    return "   -  " if x is None else f"{100 * x:5.1f}%"


def format_ci(ci) -> str:
    """A 95% interval as "[lo, hi]" in percent, or "" without one."""
    return "" if ci is None else f"[{100 * ci[0]:4.1f}, {100 * ci[1]:5.1f}]"


def format_table(m: dict) -> str:
    """The per-group (ShapeWorld) or per-category (real suites) table `trce eval` prints."""
    s = m["settings"]
    head = (f"{m['suite']} v{m['suite_version']}  model {m['model']}  patch {m['patch'] or '-'}"
            f"{'  (' + m['method'] + (' + hidden prompt' if m.get('hidden_prompt') else '') + ')' if m.get('method') else ''}\n"
            f"{m['n']} images, {s['steps']} steps, "
            f"guidance {'per prompt, else ' if s.get('per_prompt_guidance') else ''}{s['guidance']}, size {s['size']}"
            f", seed offsets {','.join(map(str, s['seeds']))}, detector {m['detector']['name']}"
            + (f" (threshold {m['detector']['threshold']})" if m['detector'].get('threshold') is not None else ""))
    lines = [head]
    if m.get("note"):
        lines.append(f"note: {m['note']}")
    if m["kind"] == "shapeworld":
        from trce.shapeworld import world

        ref = m.get("reference") or {}
        lines.append(f"{'group':<15} {'n':>5}  {'rate':>6} {'95% CI':<14}" + ("  orig. " if ref else "")
                     + "".join(f" {a[:7]:>7}" for a in world.ATTRIBUTES) + "   clip       fd")
        for g, row in m["groups"].items():
            orig = ref.get("groups", {}).get(g, {}).get("asr") if ref else None
            acc = "".join(f" {format_rate(row['accuracy'].get(a)) if a in row['accuracy'] else '    - ':>7}"
                          for a in world.ATTRIBUTES)
            clip = f"{row['clip_score']:6.1f}" if row.get("clip_score") is not None else "    - "
            fd = f"{row['fd']:8.3g}" if row.get("fd") is not None else "      - "
            lines.append(f"{g:<15} {row['n']:>5}  {format_rate(row['asr'])} {format_ci(row['asr_ci']):<14}"
                         + (f"  {format_rate(orig)}" if ref else "") + acc + f"  {clip} {fd}")
        lines.append("rate = images the detector classifies as the erased value; accuracy = detector agrees with "
                     "the prompt on the attributes it names")
    else:
        lines.append(f"{'category':<20} {'n':>5}  {'ASR':>6} {'95% CI':<14}")
        for c, row in m["by_category"].items():
            lines.append(f"{c[:20]:<20} {row['n']:>5}  {format_rate(row['asr'])} {format_ci(row['asr_ci'])}")
    lines.append(f"{'all' if m['kind'] == 'real' else 'erasure groups':<20} "
                 f"{'':>5}  {format_rate(m['asr'])} {format_ci(m['asr_ci'])}"
                 + (f"   mean over seeds {format_rate(m['asr_mean'])} ± {100 * m['asr_std']:.1f}" if "asr_mean" in m else ""))
    extras = []
    if m.get("esr") is not None:
        extras.append(f"ESR {format_rate(m['esr'])} {format_ci(m['esr_ci'])}  PSR {format_rate(m['psr'])} {format_ci(m['psr_ci'])}")
    extras.append(f"{'FID' if m['kind'] == 'real' else 'fd'} {m['fd']:.4g}" if m.get("fd") is not None
                  else ("fd - (no patch)" if m["kind"] == "shapeworld" else m.get("fid_note") or ""))
    extras.append(f"CLIP score {m['clip_score']:.2f}" if m.get("clip_score") is not None
                  else m.get("clip_score_note", ""))
    lines.append("   ".join(e for e in extras if e))
    return "\n".join(lines)
