"""`trce info`: a model's components, parameter counts, device, dtype and fingerprint."""

from __future__ import annotations

import json

from trce.cli.common import add_model_args, parser_kwargs


def register(sub) -> None:
    p = sub.add_parser("info", **parser_kwargs(
        "Describe a model: components, parameter counts, device, dtype, fingerprint.",
        "  trce info --model shapeworld\n  trce info --model sd14-arch --json\n"))
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from trce.loading import describe, load_pipeline

    info = describe(load_pipeline(args.model, device=args.device, dtype=args.dtype))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    w = max(12, *(len(name) + 1 for name in info["parameters"]))
    print(f"{'model':<{w}} {info['model']}  ({info['family']}, {info['device']}, {info['dtype']})")
    for name, n in info["parameters"].items():
        print(f"{name:<{w}} {n / 1e6:9.2f} M parameters")
    print(f"{'total':<{w}} {info['parameters_total'] / 1e6:9.2f} M parameters")
    if "image_size" in info:
        side = info.get("unet_sample_size")
        print(f"{'image':<{w}} {info['image_size']}x{info['image_size']}" + (f" (latent {side}x{side})" if side else ""))
    if "text_width" in info:
        if "joint_blocks" in info:  # MMDiT: text joins the image tokens in joint attention
            blocks = f"{info['joint_blocks']} joint" + (f" + {info['single_blocks']} single-stream"
                                                        if "single_blocks" in info else "") + " blocks"
        else:
            blocks = f"{info.get('cross_attention_layers', 0)} cross-attention layers"
        print(f"{'text':<{w}} width {info['text_width']}, {info['max_tokens']} tokens; {blocks}")
    print(f"{'fingerprint':<{w}} {info['fingerprint']}")
    return 0
