"""`trce erase`, `trce export` and `trce concepts`: erase a concept into a patch, bake a patch into a
full diffusers folder, and list/show concept specs. The library does the work; this module parses,
does I/O and reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from trce.errors import TrceError

log = logging.getLogger("trce")

# Keys a `--config run.yaml` may set (command-line flags win over the file).
CONFIG_KEYS = ("concept", "method", "stages", "eta", "ridge", "token_role", "preserve_role", "data", "seed", "cache",
               "V", "kpop", "esd")


def add_commands(sub, parser_kwargs, add_model_args) -> None:
    p = sub.add_parser("erase", **parser_kwargs(
        "Erase a concept from a model and write the edit as a patch folder.",
        "  trce erase --concept shapeworld-red --out runs/red                 # TRCE stage T on ShapeWorld\n"
        "  trce erase --concept shapeworld-red --method uce --out runs/red-uce  # the UCE-style baseline\n"
        "  trce erase --model CompVis/stable-diffusion-v1-4 --concept sexual --data ../shared/data --out runs/nsfw\n"
        "  trce erase --concept my-concept.yaml --eta 0.05 --token-role eot-all --out runs/mine\n"
        "  trce erase --concept shapeworld-red --concept shapeworld-star --out runs/two   # one solve for both\n"
        "  trce erase --concept shapeworld-red --stages T,V --set V.epochs=1 --out runs/red-tv   # TRCE T+V\n"
        "  trce erase --concept shapeworld-3shapes --method kpop --set kpop.iterations=300 --out runs/kpop\n"
        "  trce erase --concept shapeworld-3shapes --method esd --set esd.params=non-cross-attn --out runs/esd-u\n"
        "  trce generate --patch runs/red --prompt \"a crimson star on a black background\" --out x.png\n"))
    add_model_args(p)
    p.add_argument("--concept", action="append", default=argparse.SUPPRESS,
                   help="a built-in concept (see `trce concepts`) or a spec YAML path; repeat or comma-separate "
                        "to erase several at once")
    p.add_argument("--method", default=argparse.SUPPRESS, help="trce, uce, kpop or esd (default trce)")
    p.add_argument("--stages", default=argparse.SUPPRESS, help="stages of --method trce: T, V or T,V (default T)")
    p.add_argument("--out", required=True, help="patch folder to write (replaced atomically)")
    p.add_argument("--eta", type=float, default=argparse.SUPPRESS,
                   help="weight of the preservation term (default: the spec's)")
    p.add_argument("--ridge", type=float, default=argparse.SUPPRESS,
                   help="relative ridge of the solve (default: the spec's)")
    p.add_argument("--token-role", default=argparse.SUPPRESS,
                   help="eot, eot-all, key, sot or a '+' combination (default: the spec's; uce uses key)")
    p.add_argument("--preserve-role", default=argparse.SUPPRESS,
                   help="token positions of the preservation prompts: all (default), eot, eot-all, sot, "
                        "a '+' combination, or same (the mapped role without key)")
    p.add_argument("--config", default=argparse.SUPPRESS, help="a YAML file with any of: " + ", ".join(CONFIG_KEYS))
    p.add_argument("--data", default=argparse.SUPPRESS,
                   help="data folder holding prompts/coco_30k.csv (or set TRCE_DATA)")
    p.add_argument("--cache", default=argparse.SUPPRESS,
                   help="prior cache folder (default $TRCE_CACHE or ~/.cache/trce)")
    p.add_argument("--no-cache", action="store_true", help="recompute the preservation prior, write no cache")
    p.add_argument("--seed", type=int, default=argparse.SUPPRESS, help="random seed of the run (default 0; recorded)")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                   help="a setting of stage V, kpop or esd, e.g. V.epochs=1, V.n_trajectories=32, kpop.iterations=300, "
                        "esd.lr=1e-4 (also as sections `V:` / `kpop:` / `esd:` of --config)")
    p.set_defaults(func=cmd_erase)

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


# --------------------------------------------------------------------------- erase
def _run_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml

    file = Path(path).expanduser()
    if not file.exists():
        raise TrceError(f"config file {file} does not exist")
    try:
        raw = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise TrceError(f"config file {file} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(raw, dict):
        raise TrceError(f"config file {file} must hold a mapping of settings, got {type(raw).__name__}")
    raw = {str(k).replace("-", "_"): v for k, v in raw.items()}
    for key in raw:
        if key not in CONFIG_KEYS:
            raise TrceError(f"config file {file}: unknown setting {key!r}; known: {', '.join(CONFIG_KEYS)}")
    return raw


def _concept_names(values: Any) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, list):
        raise TrceError(f"concept must be a name, a path or a list of them, got {values!r}")
    out = []
    for v in values:
        v = str(v)
        out.extend([v] if Path(v).expanduser().exists() else [x.strip() for x in v.split(",") if x.strip()])
    return out


def _check_out(out: Path, marker: str, what: str) -> None:
    """Refuse to replace a folder that is not one of ours (an existing `marker` file says it is)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).exists())):
        raise TrceError(f"--out {out} exists and is not a {what}; choose a new folder")


def cmd_erase(args) -> int:
    import torch

    from trce.concepts import load_spec
    from trce.loading import load_pipeline
    from trce.methods import erase, get_method, parse_stages, spec_settings, stage_config
    from trce.methods.stage_t import StageTConfig

    cfg = _run_config(getattr(args, "config", None))
    # Flags left out are absent from `args` (SUPPRESS), so the config file and the spec decide.
    flags = {k: getattr(args, k, None) for k in CONFIG_KEYS}
    settings = {"method": "trce", "stages": None, "preserve_role": "all", "seed": 0, **cfg,
                **{k: v for k, v in flags.items() if v is not None}}
    names = _concept_names(settings.get("concept"))
    if not names:
        raise TrceError("no concept given: pass --concept NAME (see `trce concepts`) or a spec YAML path")
    method = get_method(str(settings["method"]))
    stages = parse_stages(method, None if settings["stages"] is None else str(settings["stages"]))
    specs = [load_spec(n) for n in names]
    out = Path(args.out)
    _check_out(out, "patch.json", "trce patch folder")
    t_config = StageTConfig(
        eta=_number(settings.get("eta"), "eta"), ridge=_number(settings.get("ridge"), "ridge"),
        token_role=settings.get("token_role"), preserve_role=str(settings["preserve_role"]),
        data_dir=settings.get("data"), cache_dir=settings.get("cache"), use_cache=not args.no_cache,
    )
    seed = int(settings["seed"])
    torch.manual_seed(seed)
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    t0 = time.perf_counter()
    configs: dict[str, Any] = {"T": t_config}
    sections = _stage_sections(cfg, args.set)
    if "V" in stages and method.name == "trce":
        configs["V"] = stage_config("trce", "V", spec_settings(specs, "V", sections.get("V")), seed=seed)
    if method.name in ("kpop", "esd"):
        configs[method.name] = stage_config(method.name, method.name,
                                            spec_settings(specs, method.name, sections.get(method.name)), seed=seed)
    options = {"V": {"cache_dir": settings.get("cache")}} if "V" in configs else {}
    if "kpop" in configs:
        options["kpop"] = {"data_dir": settings.get("data")}
    edit = erase(pipe, specs if len(specs) > 1 else specs[0], method=method.name, stages=stages, configs=configs,
                 options=options)
    seconds = time.perf_counter() - t0
    record = {"command": "erase", "model": args.model, "concepts": names, "method": method.name,
              "stage_settings": {k: dataclasses.asdict(v) for k, v in configs.items() if k != "T"},
              "stages": list(stages), **{k: settings.get(k) for k in ("eta", "ridge", "token_role", "preserve_role",
                                                                       "data", "cache")},
              "no_cache": args.no_cache, "device": str(pipe.device), "dtype": str(pipe.unet.dtype)}
    edit.save(out, config=record, seeds={"seed": seed})
    print(f"erased {edit.spec.get('name')} with {method.name} stage {','.join(stages)} on {args.model}: "
          f"{len(edit.weights)} tensors in {seconds:.1f} s -> {out}")
    return 0


def _stage_sections(cfg: dict[str, Any], assignments: list[str]) -> dict[str, dict[str, Any]]:
    """Per-stage settings: `V:`/`kpop:`/`esd:` sections of --config, then `--set STAGE.KEY=VALUE` on top."""
    sections: dict[str, dict[str, Any]] = {}
    for stage in ("V", "kpop", "esd"):
        value = cfg.get(stage) or {}
        if not isinstance(value, dict):
            raise TrceError(f"config section {stage!r} must be a mapping of settings, got {value!r}")
        sections[stage] = dict(value)
    for item in assignments:
        key, sep, value = item.partition("=")
        stage, dot, name = key.partition(".")
        if not sep or not dot or stage not in sections or not name:
            raise TrceError(f"bad --set {item!r}; use V.KEY=VALUE, kpop.KEY=VALUE or esd.KEY=VALUE")
        sections[stage][name] = value
    return sections


def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TrceError(f"{name} must be a number, got {value!r}") from None


# --------------------------------------------------------------------------- export
def cmd_export(args) -> int:
    from trce.edit import load_patch
    from trce.loading import load_pipeline
    from trce.utils import io

    out = Path(args.out)
    _check_out(out, "model_index.json", "diffusers pipeline folder")
    patch = load_patch(args.patch)  # refuse a broken patch before loading the model
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    patch.apply(pipe)
    meta = io.read_json(Path(args.patch) / "patch.json")
    with io.atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        io.write_json(tmp / "trce-export.json", io.run_record(
            {"command": "export", "model": args.model, "patch": str(args.patch), "dtype": str(pipe.unet.dtype)},
            patch={k: meta.get(k) for k in ("method", "spec", "settings", "base", "date", "git_hash")}))
    print(f"exported {args.model} with the {patch.method} patch {args.patch} ({len(patch.weights)} tensors) -> {out}")
    return 0


# --------------------------------------------------------------------------- concepts
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
    specs = builtin_specs()
    rows = []
    for s in specs.values():
        rows.append({
            "name": s.name, "aliases": list(s.aliases), "expressions": len(s.expressions),
            "templates": len(s.templates), "preserve": s.preservation.source,
            "attribute": s.attribute, "values": list(s.values), "description": s.description,
        })
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
