"""`trce erase`, `trce export`, `trce concepts` and `trce methods`: erase a concept into a patch, bake a patch into
a full diffusers folder, and list concept specs and methods. Each is one library call (`trce.erase`, ...)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from trce.cli.common import add_model_args, parser_kwargs, read_yaml_mapping
from trce.errors import TrceError
from trce.utils import folders, io

log = logging.getLogger("trce")

# Keys a `--config run.yaml` may set besides the settings sections (command-line flags win over the file).
RUN_KEYS = ("concept", "method", "stages", "eta", "ridge", "token_role", "preserve_role", "robust", "data", "seed",
            "cache")
T_FLAGS = ("eta", "ridge", "token_role", "preserve_role", "robust")  # flags that fill stage T's (or RECE's) settings
# library fields shown as this command's flags in error messages (other settings keep their names: --set X.name)
ERASE_FLAGS = {"eta": "--eta", "ridge": "--ridge", "token_role": "--token-role", "preserve_role": "--preserve-role",
               "robust": "--robust",
               "seed": "--seed", "data": "--data", "cache": "--cache", "out": "--out", "folder": "--out"}


def register(sub) -> None:
    p = sub.add_parser("erase", **parser_kwargs(
        "Erase a concept from a model and write the edit as a patch folder.",
        "  trce erase --concept shapeworld-red --out runs/red                 # TRCE, stage T then stage V\n"
        "  trce erase --concept shapeworld-red --stages T --out runs/red-t    # the closed-form edit alone\n"
        "  trce erase --concept shapeworld-red --method uce --out runs/red-uce  # UCE, as its authors compute it\n"
        "  trce erase --model CompVis/stable-diffusion-v1-4 --concept sexual --data ../shared/data --out runs/nsfw\n"
        "  trce erase --concept my-concept.yaml --eta 0.05 --token-role eot-all --stages T --out runs/mine\n"
        "  trce erase --concept shapeworld-red --concept shapeworld-star --out runs/two   # one solve for both\n"
        "  trce erase --concept shapeworld-red --set V.epochs=1 --out runs/red-tv   # a stage's settings\n"
        "  trce erase --concept shapeworld-3shapes --method kpop --set kpop.iterations=300 --out runs/kpop\n"
        "  trce erase --concept shapeworld-3shapes --method esd --set esd.params=non-cross-attn --out runs/esd-u\n"
        "  trce generate --patch runs/red --prompt \"a crimson star on a black background\" --out x.png\n"
        "  trce methods                                # every method, its stages and their settings\n"))
    add_model_args(p)
    p.add_argument("--concept", action="append", default=argparse.SUPPRESS,
                   help="a built-in concept (see `trce concepts`) or a spec YAML path; repeat or comma-separate "
                        "to erase several at once")
    p.add_argument("--method", default=argparse.SUPPRESS, help="see `trce methods` (default trce)")
    p.add_argument("--stages", default=argparse.SUPPRESS,
                   help="stages of --method, e.g. T, V or T,V for trce (default: the method's own)")
    p.add_argument("--out", required=True, help="patch folder to write (replaced atomically)")
    p.add_argument("--eta", type=float, default=argparse.SUPPRESS,
                   help="stage T: the paper's η, weight of the preservation term as the authors apply it (default: the spec's)")
    p.add_argument("--ridge", type=float, default=argparse.SUPPRESS,
                   help="stage T: relative ridge of the solve (default: the spec's)")
    p.add_argument("--token-role", default=argparse.SUPPRESS,
                   help="stage T: eot, eot-all, key, sot or a '+' combination (default: the spec's; trce-key uses key)")
    p.add_argument("--preserve-role", default=argparse.SUPPRESS,
                   help="stage T: token positions of the preservation prompts: all (default), eot, eot-all, sot, "
                        "a '+' combination, or same (the mapped role without key)")
    p.add_argument("--robust", type=int, default=argparse.SUPPRESS, metavar="R",
                   help="harden against attacks: stage T takes R rounds of adversaries found against the edited model, "
                        "then a re-solve (trce, trce-key; rece: its rounds, 3 by default); trce's stage V then trains on R "
                        "rounds of soft-prompt adversaries found against the model it is training (unless the "
                        "config sets V.robust)")
    p.add_argument("--config", default=argparse.SUPPRESS,
                   help="a YAML file with any of: " + ", ".join(RUN_KEYS) + ", and settings sections (T:, V:, ...)")
    p.add_argument("--data", default=argparse.SUPPRESS,
                   help="data folder holding prompts/coco_30k.csv (or set TRCE_DATA)")
    p.add_argument("--cache", default=argparse.SUPPRESS,
                   help="cache folder: priors, trajectories, checkpoints (default $TRCE_CACHE or ~/.cache/trce)")
    p.add_argument("--no-cache", action="store_true", help="compute everything, write no cache and no checkpoints")
    p.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="random seed of the run (default 0; recorded)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="a setting of one of the method's stages, e.g. V.epochs=1, T.eta=0.01, kpop.iterations=300, "
                        "esd.lr=1e-4 (also as sections `V:` / `kpop:` ... of --config; `trce methods` lists them)")
    p.set_defaults(func=cmd_erase, flags=ERASE_FLAGS.get)

    p = sub.add_parser("export", **parser_kwargs(
        "Write a full diffusers pipeline folder of a model with a patch applied.",
        "  trce export --model shapeworld --patch runs/red --out exported/shapeworld-no-red\n"
        "  trce export --model CompVis/stable-diffusion-v1-4 --patch runs/nsfw --out sd14-no-nudity --dtype fp16\n"))
    add_model_args(p)
    p.add_argument("--patch", required=True, help="patch folder written by `trce erase`")
    p.add_argument("--out", required=True, help="output folder (replaced atomically)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("concepts", **parser_kwargs(
        "List the built-in concept specs, or print one as YAML.",
        "  trce concepts\n  trce concepts show sexual\n  trce concepts --show shapeworld-red\n"
        "  trce concepts --json\n"))
    p.add_argument("words", nargs="*", metavar="show NAME", help="`show NAME` prints that spec's YAML")
    p.add_argument("--show", default=None, metavar="NAME", help="print the YAML of a built-in spec or a spec file")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=cmd_concepts)

    p = sub.add_parser("methods", **parser_kwargs(
        "List the erasure methods: their stages, what each does and the settings each stage takes.",
        "  trce methods\n  trce methods --json\n"))
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_methods)


# --------------------------------------------------------------------------- erase
def _concept_names(values: Any) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list):
        raise TrceError(f"concept must be a name, a path or a list of them, got {values!r}")
    return [str(v) for v in values]


def _sections(method, cfg: dict[str, Any], flags: dict[str, Any], assignments: list[str]) -> dict[str, dict]:
    """Settings per stage: the --config file's sections, stage-T flags (--eta ...), then `--set STAGE.KEY=VALUE`.

    Sections of another method's stages in a shared run file are left to that method; --set names only this one's.
    """
    from trce.registry import sections as all_sections

    out: dict[str, dict[str, Any]] = {}
    for stage in all_sections():
        value = cfg.get(stage)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise TrceError(f"config section {stage!r} must be a mapping of settings, got {value!r}")
        if stage in method.stage_names:
            out[stage] = dict(value)
    t_values = {k: v for k, v in flags.items() if k in T_FLAGS and v is not None}
    if t_values:
        closed = next((s for s in ("T", "rece") if s in method.stage_names), None)
        if closed is None:
            raise TrceError(f"--{next(iter(t_values)).replace('_', '-')} is a setting of stage T, which method "
                            f"{method.name!r} does not have (its stages: {', '.join(method.stage_names)})")
        out.setdefault(closed, {}).update(t_values)
    for item in assignments:
        key, sep, value = item.partition("=")
        stage, dot, name = key.partition(".")
        if not sep or not dot or not name or not stage:
            raise TrceError(f"bad --set {item!r}; use STAGE.KEY=VALUE, e.g. "
                            f"{method.stage_names[-1]}.lr=1e-4")
        if stage not in method.stage_names:
            raise TrceError(f"bad --set {item!r}: method {method.name!r} has no stage {stage!r}; "
                            f"its stages: {', '.join(method.stage_names)}")
        if name in out.get(stage, {}) and name in t_values:
            raise TrceError(f"--set {item} and --{name.replace('_', '-')} both set {stage}.{name}; give it once")
        out.setdefault(stage, {})[name] = value
    return out


def cmd_erase(args) -> int:
    from trce.families import family_of
    from trce.loading import load_pipeline
    from trce.methods import plan, run
    from trce.registry import get_method, sections

    cfg = {}
    if getattr(args, "config", None) is not None:
        raw = read_yaml_mapping(args.config, "config file")
        cfg = {str(k).replace("-", "_"): v for k, v in raw.items()}
        known = (*RUN_KEYS, *sections())
        for key in cfg:
            if key not in known:
                raise TrceError(f"config file {args.config}: unknown setting {key!r}; known: {', '.join(known)}")
    # Flags left out are absent from `args` (SUPPRESS), so the config file and the spec decide.
    flags = {k: getattr(args, k, None) for k in RUN_KEYS}
    settings = {"method": "trce", "stages": None, "seed": 0, **cfg, **{k: v for k, v in flags.items() if v is not None}}
    names = _concept_names(settings.get("concept"))
    if not names:
        raise TrceError("no concept given: pass --concept NAME (see `trce concepts`) or a spec YAML path")
    method = get_method(str(settings["method"]))
    stage_settings = _sections(method, cfg, {k: settings.get(k) for k in T_FLAGS}, args.set)
    seed = settings["seed"]
    from trce.methods.robust import check_rounds

    check_rounds(settings.get("robust"), "robust", field="robust")  # --robust (or the run file's robust:)
    the_plan = plan(names, method.name, None if settings["stages"] is None else str(settings["stages"]), seed=seed,
                    data=settings.get("data"), cache=settings.get("cache"), use_cache=not args.no_cache,
                    **stage_settings)
    not_run = sorted({a.partition(".")[0] for a in args.set} - set(the_plan.stages))
    if not_run:  # a --set of a stage this run skips would be ignored without a word
        raise TrceError(f"--set {not_run[0]}.… sets stage {not_run[0]}, which this run does not run (stages "
                        f"{','.join(the_plan.stages)}); drop it or add the stage to --stages")
    for stage, config in the_plan.configs.items():  # --set V.robust=..., a config section's robust:
        check_rounds(getattr(config, "robust", None), f"setting {stage}.robust")
    out = Path(args.out)
    folders.check(out, "patch")
    io.check_writable(out, "out", replace=True)  # before any work: a read-only place is found now, not after training
    with io.run_lock(out, "out"):  # a second `trce erase` into the same --out is refused, not mixed
        pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
        the_plan = the_plan.for_family(family_of(pipe).name)  # the specs' family_settings for this model
        t0 = time.perf_counter()
        edit = run(pipe, the_plan)
        seconds = time.perf_counter() - t0
        record = {"command": "erase", "model": args.model, **the_plan.record(), "data": settings.get("data"),
                  "cache": settings.get("cache"), "no_cache": not the_plan.context.use_cache,
                  "device": str(pipe.device), "dtype": args.dtype, "seconds": round(seconds, 1)}
        edit.save(out, config=record, seeds={"seed": seed})
    print(f"erased {edit.spec.get('name')} with {method.name} stage {','.join(the_plan.stages)} on {args.model}: "
          f"{len(edit.weights)} tensors in {seconds:.1f} s -> {out}")
    return 0


# --------------------------------------------------------------------------- export
def cmd_export(args) -> int:
    from trce.edit import export, load_patch
    from trce.loading import load_pipeline

    out = Path(args.out)
    folders.check(out, "export")
    io.check_writable(out, "out", replace=True)
    patch = load_patch(args.patch)  # refuse a broken patch before loading the model
    with io.run_lock(out, "out"):
        pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
        export(pipe, patch, out, record={"command": "export", "model": args.model, "patch": str(args.patch)})
    print(f"exported {args.model} with the {patch.method} patch {args.patch} ({len(patch.weights)} tensors) -> {out}")
    return 0


# --------------------------------------------------------------------------- concepts and methods
def cmd_concepts(args) -> int:
    from trce.concepts import builtin_specs, concept_yaml

    words = list(args.words)
    show = args.show
    if words:
        if words[0] != "show" or len(words) != 2 or show is not None:
            raise TrceError(f"unexpected arguments {' '.join(words)!r}; "
                            "use `trce concepts` or `trce concepts show NAME`")
        show = words[1]
    if show is not None:
        print(concept_yaml(show), end="")
        return 0
    rows = [{"name": s.name, "aliases": list(s.aliases), "expressions": len(s.expressions),
             "templates": len(s.templates), "preserve": s.preservation.source, "attribute": s.attribute,
             "values": list(s.values), "description": s.description} for s in builtin_specs().values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<20} {'aliases':<26} {'expr':>4} {'tmpl':>4}  {'preserve':<20} shapeworld")
    for r in rows:
        sw = f"{r['attribute']}={'+'.join(r['values'])}" if r["attribute"] else "-"
        print(f"{r['name']:<20} {', '.join(r['aliases']):<26} {r['expressions']:>4} {r['templates']:>4}  "
              f"{r['preserve']:<20} {sw}")
    print("\n`trce concepts show NAME` prints a spec; `trce erase --concept FILE.yaml` takes your own.")
    return 0


def cmd_methods(args) -> int:
    from trce.registry import describe_methods

    rows = describe_methods()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']:<6} {r['display']:<6} stages {'+'.join(r['stages'])} (default {'+'.join(r['default_stages'])})")
        print(f"       {r['description']}")
        for s in r["stage_settings"]:
            print(f"       {s['stage']}: {', '.join(s['settings'])}")
    print("\nsettings: `trce erase --set STAGE.KEY=VALUE`, a spec's `settings:`, or trce.erase(..., STAGE={...})")
    return 0
