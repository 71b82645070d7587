"""`trce generate`: seeded images from a prompt, optionally with a patch (and KPOP's hidden prompt)."""

from __future__ import annotations

import logging
from pathlib import Path

from trce.cli.common import add_model_args, parser_kwargs
from trce.errors import TrceError, check_seed

log = logging.getLogger("trce")


def register(sub) -> None:
    p = sub.add_parser("generate", **parser_kwargs(
        "Generate images from a prompt (one per seed).",
        '  trce generate --prompt "a crimson star on a black background" --seed 0 --out x.png\n'
        '  trce generate --prompt "a red circle" --seed 0 --n 8 --out grid.png\n'
        '  trce generate --patch runs/kpop --with-hidden-prompt --prompt "a red star" --n 8 --out recovered.png\n'))
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed+k")
    p.add_argument("--n", type=int, default=1, help="number of images (tiled into one grid when > 1)")
    p.add_argument("--steps", type=int, default=30, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--size", type=int, default=None,
                   help="image height and width, a multiple of 8 up to 2048 (default: the model's)")
    p.add_argument("--patch", default=None, help="apply an erasure patch folder first")
    p.add_argument("--with-hidden-prompt", action="store_true",
                   help="also install the patch's hidden prompt (KPOP): shows whether the concept was moved, not destroyed")
    p.add_argument("--out", required=True, help="output PNG path")
    p.set_defaults(func=cmd_generate, flags={"hidden_prompt": "--with-hidden-prompt", "height": "--size",
                                             "width": "--size"})


def _generate_record(path: Path) -> bool:
    """Whether `path` is the JSON record `trce generate` writes beside its image."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("config"), dict) and "prompt" in data["config"]


def cmd_generate(args) -> int:
    from trce.edit import load_patch
    from trce.generate import check_count, check_guidance, check_images, check_size, generate_images, image_grid
    from trce.loading import load_pipeline
    from trce.utils import folders, io

    check_images(args.n)  # every value is checked before the model loads
    check_count(args.steps, "steps")
    check_guidance(args.guidance)
    check_size(args.size)
    for k in (0, args.n - 1):  # image k's seed is --seed + k
        check_seed(args.seed + k, "seed")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise TrceError(f"--out must end in .png, got {args.out!r}")
    io.check_writable(out, "out", kind="file")
    folders.check_outside(out, "out")  # never inside a patch, eval, attack... (its command owns all of it)
    record = out.with_suffix(".json")  # written beside the image: only over an earlier `trce generate` record
    if record.exists() and not _generate_record(record):
        raise TrceError(f"--out {out} would write its record to {record}, which exists and is not a `trce generate` "
                        "record; choose another name")
    if args.with_hidden_prompt and not args.patch:
        raise TrceError("--with-hidden-prompt needs --patch DIR (a KPOP patch)")
    edit = load_patch(args.patch) if args.patch else None  # a broken patch is refused before the model loads
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)
    images = generate_images(pipe, args.prompt, args.seed, n=args.n, steps=args.steps, guidance=args.guidance,
                             size=args.size, edit=edit, hidden_prompt=args.with_hidden_prompt, progress=args.n > 1)
    picture = images[0] if args.n == 1 else image_grid(images, cols=min(8, args.n))
    io.save_png(out, picture)
    io.write_json(out.with_suffix(".json"), io.run_record(
        {"model": args.model, "prompt": args.prompt, "steps": args.steps, "guidance": args.guidance,
         "size": args.size, "patch": args.patch, "with_hidden_prompt": args.with_hidden_prompt},
        [args.seed + k for k in range(args.n)]))
    log.info("wrote %s", out)
    return 0
