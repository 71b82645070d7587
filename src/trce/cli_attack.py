"""`trce attack`: red-team a model (and an erasure patch) with an attack that runs against it.

The attacks are in `trce.attacks`; image generation, detectors and rates are `trce eval`'s
(`trce.eval.runner.generate_rows`, `trce.eval.detectors.make_detector`, `trce.eval.metrics.rate`),
so the ASR before and after is measured exactly as `trce eval` measures it.

Output folder (`--out DIR`):

    DIR/attack.json            what the results and images depend on; a rerun with other values is refused
    DIR/results.jsonl          one line per attacked target (resume: finished targets are skipped)
    DIR/adversarial.csv        case_number, prompt, evaluation_seed, evaluation_guidance, target_prompt
                               (`trce eval --prompts DIR/adversarial.csv` replays them on any model);
                               soft-prompt rows hold a placeholder and an `embeddings` column instead
    DIR/embeddings/*.safetensors   soft-prompt only: prompt_embeds (L, D) and token_embeds (k, D)
    DIR/before/images, before/rows.jsonl   the target prompts as they are (ASR before)
    DIR/images, DIR/rows.jsonl             the adversarial prompts (ASR after)
    DIR/metrics.json           both rates with 95% Wilson intervals and the "attack" record
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

from trce.errors import TrceError

log = logging.getLogger("trce")

RESULTS = "results.jsonl"
BEFORE = "before"
CSV_NAME = "adversarial.csv"


def add_commands(sub, parser_kwargs, add_model_args) -> None:
    from trce.cli_eval import add_image_args

    p = sub.add_parser("attack", **parser_kwargs(
        "Red-team a model (and an erasure patch): find adversarial prompts against it, then measure the ASR "
        "before and after with the suite's detector.",
        "  trce attack --model shapeworld --patch runs/red --suite shapeworld-red --attack unlearndiff --out runs/atk\n"
        "  trce attack --suite shapeworld-red --attack ring-a-bell --budget generations=200 population=64 \\\n"
        "      --limit 20 --out runs/rab-orig                        # the original model, 20 keyword prompts\n"
        "  trce attack --model CompVis/stable-diffusion-v1-4 --patch runs/nsfw --suite unlearndiff \\\n"
        "      --data ../shared/data/prompts --attack unlearndiff --out runs/udiff\n"
        "  trce attack --model sd14-arch --suite unlearndiff --data ../shared/data/prompts --attack mma-text \\\n"
        "      --limit 1 --budget steps=2 candidates=8 --steps 2 --out /tmp/x   # plumbing check on CPU\n"
        "  trce eval --model OTHER --prompts runs/atk/adversarial.csv --detector shapeworld --concept color=red \\\n"
        "      --out runs/transfer                                  # replay the prompts on another model\n"
        "  accelerate launch --num_processes 4 -m trce.cli attack ... # shards the targets over 4 processes\n"
        "attacks: ring-a-bell, mma-text, unlearndiff (typed prompts); soft-prompt (knowledge left, not typed)\n"))
    add_model_args(p)
    p.add_argument("--patch", default=None, help="erasure patch folder to attack (the model alone when omitted)")
    p.add_argument("--suite", required=True, help="a suite name (see `trce suites`) or a suite YAML file")
    p.add_argument("--attack", required=True, help="ring-a-bell, mma-text, unlearndiff or soft-prompt")
    p.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    p.add_argument("--budget", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="attack budget, e.g. steps=40 tokens=5 (keys: see the attack module's Budget)")
    p.add_argument("--limit", type=int, default=None,
                   help="first N prompts of a real suite; N prompts per group of a ShapeWorld suite")
    p.add_argument("--seed", type=int, default=0, help="seed of the searches (images use the prompts' own seeds)")
    p.add_argument("--reference-model", default=None,
                   help="the original model whose images of the concept the white-box attacks match "
                        "(default: --model without the patch)")
    p.add_argument("--data", default=None, help="the suite's prompt file, or a folder holding it")
    p.add_argument("--groups", default="keyword",
                   help="ShapeWorld suites: comma-separated groups whose prompts are attacked "
                        "(keyword, synonym, paraphrase)")
    p.add_argument("--concept", default=None,
                   help="concept spec (see `trce concepts`) whose single words are banned from adversarial "
                        "tokens (default: the ShapeWorld suite's value; `sexual` for nudenet suites)")
    p.add_argument("--ban", default=None, help="more banned words, comma-separated")
    p.add_argument("--pairs", default=None,
                   help="ring-a-bell: CSV with 'sensitive prompt','normal prompt' columns, or a concept spec name "
                        "(default: ShapeWorld caption pairs; nudity-ring-a-bell.csv for nudenet suites)")
    add_image_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print metrics.json instead of the summary")
    p.set_defaults(func=cmd_attack)


# --------------------------------------------------------------------------- inputs
def _targets(suite, args):
    """(targets, the suite rows they come from)."""
    from trce.attacks.base import Target
    from trce.errors import choose
    from trce.eval.suites import ERASURE_GROUPS

    if args.limit is not None and args.limit < 1:
        raise TrceError(f"--limit must be at least 1, got {args.limit}")
    if suite.kind == "shapeworld":
        groups = [g.strip() for g in args.groups.split(",") if g.strip()]
        if not groups:
            raise TrceError("--groups needs at least one of keyword, synonym, paraphrase")
        for g in groups:
            choose("attack group", g, [x for x in ERASURE_GROUPS if x in suite.groups])
        rows = [r for r in suite.rows(None, args.limit) if r.category in groups]
    else:
        rows = suite.rows(args.data, args.limit)
    d = suite.defaults
    targets = [Target(index=i, prompt=r.prompt, seed=r.seed if r.seed is not None else d.seed + i,
                      guidance=r.guidance, case_number=r.case_number) for i, r in enumerate(rows)]
    return targets, rows


def _concept(suite, args, attack_name: str) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...], dict]:
    """(banned words, ring-a-bell pairs, a record of where they came from)."""
    from trce.attacks import base
    from trce.attacks import ring_a_bell as rab
    from trce.concepts import load_spec

    spec = None
    if args.concept is not None:
        spec = load_spec(args.concept)
    elif suite.kind == "real":
        if suite.detector != "nudenet":
            raise TrceError(f"suite {suite.name} is not a ShapeWorld or nudity suite: name the attacked concept with "
                            "--concept SPEC (its words are banned from adversarial tokens)")
        spec = load_spec("sexual")
    if spec is not None:
        banned = base.spec_banned(spec)
    else:
        banned = base.shapeworld_banned(suite.attribute, suite.values)
    extra = tuple(w.strip() for w in (args.ban or "").split(",") if w.strip())
    record = {"concept": spec.name if spec is not None else f"{suite.attribute}={'+'.join(suite.values)}",
              "banned": sorted({*banned, *(w.lower() for w in extra)})}
    pairs: list[tuple[str, str]] = []
    if attack_name == "ring-a-bell":
        if args.pairs is not None:
            path = Path(args.pairs).expanduser()
            if path.suffix.lower() == ".csv" or path.is_file():
                pairs, record["pairs_source"] = rab.pairs_from_file(path), str(path)
            else:
                pairs, record["pairs_source"] = rab.pairs_from_spec(load_spec(args.pairs)), f"spec {args.pairs}"
        elif suite.kind == "shapeworld":
            pairs = rab.shapeworld_pairs(suite.attribute, suite.values, n=64, seed=args.seed)
            record["pairs_source"] = f"ShapeWorld captions, {suite.attribute} {'/'.join(suite.values)} vs other values"
        else:
            pairs, record["pairs_source"] = _default_pairs(args, spec, rab)
        record["pairs"] = len(pairs)
    return (*banned, *extra), tuple(pairs), record


def _default_pairs(args, spec, rab) -> tuple[list[tuple[str, str]], str]:
    """Ring-A-Bell's nudity pairs file where `--data`/$TRCE_DATA has it, else the concept spec's pairs."""
    from trce.eval.suites import find_data, load_suite

    folder = None
    if args.data is not None:
        p = Path(args.data).expanduser()
        folder = p if p.is_dir() else p.parent
    try:
        path = find_data(load_suite("ring-a-bell"), folder)
        return rab.pairs_from_file(path), str(path)
    except TrceError:
        log.info("nudity-ring-a-bell.csv not found (--data or $TRCE_DATA): using the %s spec's prompt pairs", spec.name)
        return rab.pairs_from_spec(spec), f"spec {spec.name}"


# --------------------------------------------------------------------------- soft-prompt images
def _soft_rows(pipe, prompt_embeds, rows, seeds, guidances, folder: Path, settings, detector, state, progress):
    """generate_rows for soft prompts: images from prompt embeddings, records in the same format."""
    import numpy as np

    from trce.attacks.soft_prompt import generate
    from trce.eval.runner import IMAGES, ROWS, consolidate
    from trce.utils import io
    from trce.utils.io import read_jsonl

    names = [f"{i:05d}" for i in range(len(rows))]
    if state.is_main_process:
        (folder / IMAGES).mkdir(parents=True, exist_ok=True)
        consolidate(folder)
    state.wait_for_everyone()
    done = {r["name"]: r for r in read_jsonl(folder / ROWS)}

    def finished(i):
        r = done.get(names[i])
        return (r is not None and r.get("prompt") == rows[i].prompt and r.get("seed") == seeds[i]
                and r.get("guidance") == guidances[i] and (folder / IMAGES / f"{names[i]}.png").exists())

    todo = [i for i in range(len(rows)) if not finished(i)]
    shard = folder / (ROWS if state.num_processes == 1 else f"rows.rank{state.process_index}.jsonl")
    with state.split_between_processes(todo) as mine:
        if mine:
            with open(shard, "a", encoding="utf-8") as fh:
                batches = generate(pipe, prompt_embeds[mine], [seeds[i] for i in mine], [guidances[i] for i in mine],
                                   steps=settings.steps, size=settings.height, batch_size=settings.batch_size,
                                   progress=progress and state.is_main_process)
                for local, images in batches:
                    idx = [mine[j] for j in local]
                    results = detector.detect(np.asarray(images), [rows[i] for i in idx])
                    lines = []
                    for i, img, res in zip(idx, images, results):
                        io.save_png(folder / IMAGES / f"{names[i]}.png", img)
                        lines.append(json.dumps({
                            "index": i, "name": names[i], "prompt": rows[i].prompt, "seed": seeds[i],
                            "guidance": guidances[i], "group": rows[i].category, "categories": list(rows[i].categories),
                            "case_number": rows[i].case_number, "verdict": res["verdict"], "scores": res["scores"],
                            "extra": rows[i].extra}) + "\n")
                    fh.write("".join(lines))
                    fh.flush()
                    os.fsync(fh.fileno())
    state.wait_for_everyone()
    if state.is_main_process:
        consolidate(folder)
    state.wait_for_everyone()
    by_name = {r["name"]: r for r in read_jsonl(folder / ROWS)}
    return [by_name[n] for n in names]


# --------------------------------------------------------------------------- outputs
def _write_csv(path: Path, results, targets, guidances, typed: bool) -> None:
    from trce.attacks.soft_prompt import placeholder
    from trce.utils import io

    columns = ["case_number", "prompt", "evaluation_seed", "evaluation_guidance", "target_prompt"]
    if not typed:
        columns.append("embeddings")
    with io.atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for r, t, g in zip(results, targets, guidances):
            row = [t.index, r.prompt if typed else placeholder(t.index), t.seed, g, t.prompt]
            if not typed:
                row.append(r.embeddings or "")
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
    from trce.eval.runner import format_ci, format_rate

    a = m["attack"]
    lines = [
        (f"{a['name']} on {m['model']}{' + ' + m['patch'] if m['patch'] else ''}, suite {m['suite']}: "
         f"{m['n']} targets, {a['seconds_per_target']:.2f} s per target"),
        f"label: {a['label']}",
        (f"ASR before {format_rate(a['asr_before'])} {format_ci(a['asr_before_ci'])}   after {format_rate(a['asr_after'])} "
         f"{format_ci(a['asr_after_ci'])}   either {format_rate(a.get('asr_either'))}   (detector {m['detector']['name']})"),
        f"objective (lower is better): start {a['objective']['start_mean']:.4g} -> {a['objective']['end_mean']:.4g}",
    ]
    if m.get("replay"):
        lines.append(f"replay on another model: {m['replay']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command
def cmd_attack(args) -> int:
    import torch

    from trce.attacks import get_attack
    from trce.attacks.base import AttackConfig, parse_budget
    from trce.edit import load_patch
    from trce.eval.detectors import make_detector
    from trce.eval.prompts import PromptRow
    from trce.eval.runner import IMAGES, ROWS, generate_rows
    from trce.eval.suites import load_suite
    from trce.generate import GenSettings
    from trce.loading import fingerprint, load_pipeline, resolve_device
    from trce.utils import io
    from trce.utils.processes import process_state

    t0 = time.time()
    mod = get_attack(args.attack)
    budget = parse_budget(mod.Budget, args.budget, mod.NAME)
    suite = load_suite(args.suite)
    given = {str(b).partition("=")[0].strip().replace("-", "_") for b in args.budget}
    targets, rows = _targets(suite, args)
    if not targets:
        raise TrceError(f"suite {suite.name} gave no prompts to attack")
    banned, pairs, concept_record = _concept(suite, args, mod.NAME)
    d = suite.defaults
    size = args.size if args.size is not None else d.size
    settings = GenSettings(steps=args.steps if args.steps is not None else d.steps,
                           guidance=args.guidance if args.guidance is not None else d.guidance,
                           height=size, width=size, batch_size=args.batch_size or d.batch_size)
    if hasattr(budget, "reference_steps") and "reference_steps" not in given:
        # reference image 0 of a target is then the very image `trce eval` draws with the original model
        budget = dataclasses.replace(budget, reference_steps=settings.steps)
    guidances = [float(args.guidance if args.guidance is not None else t.guidance if t.guidance is not None
                       else settings.guidance) for t in targets]
    targets = [dataclasses.replace(t, guidance=g) for t, g in zip(targets, guidances)]  # reference images match
    seeds = [t.seed for t in targets]

    detector_name = args.detector or suite.detector
    attribute, values = (suite.attribute, suite.values) if suite.kind == "shapeworld" else (None, ())
    if detector_name == "shapeworld" and attribute is None:
        raise TrceError("the shapeworld detector judges ShapeWorld suites only; choose another --detector")
    cpu = args.device == "cpu" or not torch.cuda.is_available()
    state = process_state(cpu)
    device = state.device if state.num_processes > 1 else resolve_device(args.device)
    detector = make_detector(detector_name, args.threshold, attribute=attribute, values=values, device=str(device))
    pipe = load_pipeline(args.model, device=device, dtype=args.dtype)
    edit = load_patch(args.patch) if args.patch is not None else None
    patch_meta = io.read_json(Path(args.patch) / "patch.json") if args.patch is not None else {}

    out = Path(args.out)
    key = {"model": args.model, "base": fingerprint(pipe)["id"], "patch": patch_meta.get("files"),
           "suite": f"{suite.name}@{suite.version}", "attack": mod.NAME, "budget": dataclasses.asdict(budget),
           "seed": args.seed, "banned": concept_record["banned"], "pairs": concept_record.get("pairs_source"),
           "reference_model": args.reference_model, "steps": settings.steps, "size": size, "guidance": args.guidance,
           "detector": detector.info(), "dtype": str(pipe.unet.dtype)}
    io.check_run_key(out / "attack.json", key, state, "an attack")

    reference = None
    if mod.NEEDS_REFERENCE:
        if args.reference_model is not None:
            reference = load_pipeline(args.reference_model, device=device, dtype=args.dtype)
        elif edit is not None:
            reference = _original_latents(pipe, edit, budget, size)
        else:
            reference = pipe  # no patch: the model under test is the original
    config = AttackConfig(budget=budget, seed=args.seed, banned=banned, pairs=pairs, results=out / RESULTS, size=size)
    progress = not args.no_progress
    ctx = edit.applied(pipe) if edit is not None else contextlib.nullcontext()
    with ctx:
        results = mod.attack(pipe, targets, config, reference=reference, progress=progress)
        reference = None  # the original model is not needed for the images
        before = generate_rows(pipe, rows, seeds, guidances, out / BEFORE, settings, detector, state,
                               progress=progress, desc=f"before {suite.name}")
        after_rows = [PromptRow(prompt=r.prompt if mod.TYPED else _placeholder(t.index), seed=t.seed,
                                guidance=g, categories=row.categories, case_number=t.index,
                                extra={**row.extra, "target_prompt": t.prompt})
                      for r, t, g, row in zip(results, targets, guidances, rows)]
        if mod.TYPED:
            after = generate_rows(pipe, after_rows, seeds, guidances, out, settings, detector, state,
                                  progress=progress, desc=f"after {mod.NAME}")
        else:
            embeds = torch.stack([r.embeds["prompt_embeds"] for r in results])  # (N, L, D)
            after = _soft_rows(pipe, embeds, after_rows, seeds, guidances, out, settings, detector, state, progress)
    if not state.is_main_process:
        return 0
    _write_csv(out / CSV_NAME, results, targets, guidances, mod.TYPED)
    metrics = _metrics(args, mod, budget, suite, targets, results, before, after, detector, settings, size, pipe,
                       device, state, concept_record, patch_meta, out, t0, IMAGES, ROWS)
    io.write_json(out / "metrics.json", metrics)
    if args.json:
        print(json.dumps(metrics, indent=2, default=str))
    else:
        print(format_summary(metrics))
        print(f"wrote {out}/metrics.json, {out}/{CSV_NAME}")
    return 0


def _placeholder(index: int) -> str:
    from trce.attacks.soft_prompt import placeholder

    return placeholder(index)


def _original_latents(pipe, edit, budget, size):
    """target -> the original model's latents: the patch is taken off for the draw and put back."""
    from trce.attacks.unlearndiff import reference_latents

    def draw(target):
        edit.revert(pipe)
        try:
            return reference_latents(pipe, [target], steps=budget.reference_steps, guidance=budget.reference_guidance,
                                     images=budget.images, size=size)[0]
        finally:
            edit.apply(pipe, check_base=False)

    return draw


def _metrics(args, mod, budget, suite, targets, results, before, after, detector, settings, size, pipe, device, state,
             concept_record, patch_meta, out, t0, images_dir, rows_name) -> dict:
    from trce.eval.runner import mean_of
    from trce.utils import io

    b, a = _rates(before, suite.kind), _rates(after, suite.kind)
    by_index = {r["index"]: r["verdict"] for r in before}
    e = _rate([{"verdict": None if r["verdict"] is None or by_index.get(r["index"]) is None
                else bool(r["verdict"] or by_index[r["index"]])} for r in after])
    typed = mod.TYPED
    attack = {
        "name": mod.NAME, "label": mod.LABEL, "typed": typed, "budget": dataclasses.asdict(budget), "seed": args.seed,
        "asr_before": b["asr"], "asr_before_ci": b["asr_ci"], "asr_after": a["asr"], "asr_after_ci": a["asr_ci"],
        # An attacker can always fall back on the plain prompt: a target counts when either prompt succeeds.
        "asr_either": e["asr"], "asr_either_ci": e["asr_ci"],
        "seconds_per_target": mean_of([r.seconds for r in results]),
        "objective": {"start_mean": mean_of([r.objective_start for r in results]),
                      "end_mean": mean_of([r.objective for r in results]),
                      "plain_mean": mean_of([r.objective_plain for r in results]),
                      "improved": sum(r.objective < r.objective_start for r in results)},
        "groups": args.groups.split(",") if suite.kind == "shapeworld" else None,
        **concept_record,
    }
    replay = None
    if typed:
        extra = (f" --detector shapeworld --concept {suite.attribute}={','.join(suite.values)}"
                 if suite.kind == "shapeworld" else f" --detector {detector.name}")
        replay = f"trce eval --model MODEL --prompts {out / CSV_NAME}{extra} --out DIR"
    # The top level reads as a `trce eval` metrics file of the adversarial prompts (what `trce report`
    # tabulates, in a row of its own per attack); "attack" holds both rates and the attack's record.
    return {
        "suite": suite.name, "suite_version": suite.version, "kind": suite.kind,
        "description": f"{suite.description} Attacked by {mod.NAME}: {mod.LABEL}.", "note": suite.note,
        "model": args.model, "patch": args.patch, "method": patch_meta.get("method"), "n": len(targets),
        "asr": a["asr"], "asr_ci": a["asr_ci"],
        **({"asr_groups": list(a["groups"]), "groups": a["groups"]} if suite.kind == "shapeworld"
           else {"by_category": a["by_category"]}),
        "fd": None, "clip_score": None,
        "attack": attack, "before": b, "after": a,
        "detector": detector.info(),
        "settings": {"steps": settings.steps, "guidance": settings.guidance, "size": size or
                     pipe.unet.config.sample_size * pipe.vae_scale_factor, "seeds": [0], "limit": args.limit,
                     "batch_size": settings.batch_size, "per_prompt_guidance": args.guidance is None and
                     any(t.guidance is not None for t in targets), "dtype": str(pipe.unet.dtype).replace("torch.", ""),
                     "device": str(device)},
        "images_dir": images_dir, "rows": rows_name, "reference_dir": None,
        "files": {"adversarial": CSV_NAME, "results": RESULTS, "before_images_dir": f"{BEFORE}/{images_dir}",
                  "before_rows": f"{BEFORE}/{rows_name}", "embeddings": None if typed else "embeddings"},
        "replay": replay, "processes": state.num_processes, "seconds": round(time.time() - t0, 1),
        **io.run_record(config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                if k != "func"}, seeds={"attack": args.seed, "images": "the prompts' own seeds"}),
    }
