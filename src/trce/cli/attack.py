"""`trce attack`: red-team a model (and a patch) with an attack that runs against it — one `trce.attack` call.

The output folder's layout is described in `trce.attacks.run`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from trce.cli.common import add_image_args, add_model_args, image_options, parser_kwargs

log = logging.getLogger("trce")


def register(sub) -> None:
    p = sub.add_parser("attack", **parser_kwargs(
        "Red-team a model (and an erasure patch): find adversarial prompts against it, then measure the ASR "
        "before and after with the suite's detector.",
        "  trce attack --model shapeworld --patch runs/red --suite shapeworld-red --attack unlearndiff --out runs/atk\n"
        "  trce attack --model shapeworld --patch runs/red-robust --suite shapeworld-red --attack mma-text \\\n"
        "      --budget restarts=3 --out runs/mma-r3                 # 3 seeded searches per target\n"
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
    p.add_argument("--patch", default=None,
                   help="erasure patch folder to attack (the model alone when omitted); a hardened patch (--robust, "
                        "RECE, AdvUnlearn) is attacked only on targets it was not hardened on")
    p.add_argument("--suite", required=True, help="a suite name (see `trce suites`) or a suite YAML file")
    p.add_argument("--attack", required=True, help="ring-a-bell, mma-text, unlearndiff or soft-prompt")
    p.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    p.add_argument("--budget", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="attack budget, e.g. steps=40 tokens=5 (keys: see the attack module's Budget); every attack "
                        "takes restarts=N: N independent searches per target, broken when any succeeds; "
                        "preset=NAME starts from a named cheaper budget (e.g. unlearndiff preset=fast: trce's 40-step "
                        "PEZ search instead of the authors' 50 judged timestep blocks), other keys on top")
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
    p.set_defaults(func=cmd_attack, flags={"height": "--size", "width": "--size"})


def cmd_attack(args) -> int:
    import torch

    from trce.attacks.options import AttackOptions
    from trce.attacks.outputs import CSV_NAME
    from trce.attacks.prepare import hold_out_targets, prepare
    from trce.attacks.run import run_attack
    from trce.edit import load_patch
    from trce.loading import load_pipeline, resolve_device
    from trce.utils import folders, io
    from trce.utils.processes import process_state

    options = AttackOptions(limit=args.limit, seed=args.seed, groups=args.groups, concept=args.concept, ban=args.ban,
                            pairs=args.pairs, data=args.data, progress=not args.no_progress,
                            **image_options(args))
    prepared = prepare(args.suite, args.attack, args.budget, options)  # every input checked before the model loads
    out = Path(args.out)
    folders.check(out, "attack")  # also a file where the folder goes
    io.check_writable(out, "out")
    edit = load_patch(args.patch) if args.patch is not None else None
    cpu = args.device == "cpu" or not torch.cuda.is_available()
    state = process_state(cpu)
    # a hardened patch: the targets it saw are dropped now (an all-seen suite fails before the model loads)
    prepared = hold_out_targets(prepared, edit, say=state.is_main_process)
    device = state.device if state.num_processes > 1 else resolve_device(args.device)
    # a second run into the same --out is refused here, before its models load
    with io.run_lock(out, "out") if state.is_main_process else contextlib.nullcontext():
        pipe = load_pipeline(args.model, device=device, dtype=args.dtype)
        reference = (load_pipeline(args.reference_model, device=device, dtype=args.dtype)
                     if args.reference_model is not None and prepared["mod"].NEEDS_REFERENCE else None)
        record = {k: v for k, v in vars(args).items() if k not in ("func", "flags")}
        metrics = run_attack(pipe, args.suite, args.attack, edit, args.budget, out, reference,
                       options, record, prepared=prepared, state=state)
    if metrics is None:  # a non-main process of a sharded run: rank 0 reports
        return 0
    if args.json:
        print(json.dumps(metrics, indent=2, default=str))
    else:
        print(metrics.summary())
        print(f"wrote {args.out}/metrics.json, {args.out}/{CSV_NAME}")
    return 0
