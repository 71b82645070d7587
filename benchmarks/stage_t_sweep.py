"""The η x token-role sweep of TRCE stage T on ShapeWorld (issue "Done when"), with its [KEY] ablation (`trce-key`,
paper Table 4; not UCE, which is `trce.methods.uce`).

    nice -n 19 .venv/bin/python benchmarks/stage_t_sweep.py --out runs/stage-t-sweep
    .venv/bin/python benchmarks/stage_t_sweep.py --out runs/sweep --eval-limit 200 --eval-steps 20   # images

`sweep(...)` erases `shapeworld-red` (or any concept) once per setting, writes each patch under
`out/<label>/`, calls `evaluate(patch_folder, setting)` when given (it returns a JSON-able dict,
for instance the detector rates of `trce.eval.run_eval` on keyword / held-out synonym /
paraphrase prompts), and keeps `out/results.json` up to date after every setting, so an
interrupted sweep resumes where it stopped. Settings: TRCE stage T for every η in `etas` and every
role in `roles`; the [KEY] ablation (role `key`) for every η; optionally other safe targets (`targets`, e.g.
"" = attribute unnamed vs "blue" = another value) and preservation roles (`preserve_roles`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from trce.concepts import ConceptSpec, load_spec
from trce.loading import load_pipeline
from trce.methods.stage_t import StageTConfig, erase, erase_trce_key
from trce.registry import Context
from trce.utils import io

log = logging.getLogger("stage_t_sweep")

ETAS = (0.002, 0.01, 0.05)
ROLES = ("eot", "eot-all", "key", "eot+key")


def with_target(spec: ConceptSpec, target: str) -> ConceptSpec:
    """The spec with every expression mapped to `target` instead."""
    return dataclasses.replace(spec, expressions=tuple(dataclasses.replace(e, target=target) for e in spec.expressions))


def settings_grid(etas: Sequence[float] = ETAS, roles: Sequence[str] = ROLES, include_key: bool = True,
                  targets: Sequence[str | None] = (None,), preserve_roles: Sequence[str] = ("all",)) -> list[dict]:
    grid = []
    for target in targets:
        for preserve_role in preserve_roles:
            for eta in etas:
                runs = [("trce", role) for role in roles] + ([("trce-key", "key")] if include_key else [])
                for method, role in runs:
                    label = f"{method}-eta{eta:g}-{role}-pres-{preserve_role}"
                    if target is not None:
                        label += f"-target-{target or 'unnamed'}"
                    grid.append({"label": label, "method": method, "eta": eta, "token_role": role,
                                 "preserve_role": preserve_role, "target": target})
    return grid


def sweep(evaluate: Callable[[Path, dict], dict] | None = None, *, model: str = "shapeworld",
          concept: str = "shapeworld-red", out: str | Path = "runs/stage-t-sweep", etas: Sequence[float] = ETAS,
          roles: Sequence[str] = ROLES, include_key: bool = True, targets: Sequence[str | None] = (None,),
          preserve_roles: Sequence[str] = ("all",), ridge: float | None = None, device: str | None = None,
          data: str | None = None, pipe=None) -> list[dict]:
    """Erase `concept` with every setting; returns one row per setting (patch folder, edit info, evaluation)."""
    out = Path(out)
    results_path = out / "results.json"
    done = {r["label"]: r for r in (io.read_json(results_path) if results_path.exists() else [])}
    pipe = pipe if pipe is not None else load_pipeline(model, device=device)
    base_spec = load_spec(concept)
    rows = []
    for setting in settings_grid(etas, roles, include_key, targets, preserve_roles):
        label = setting["label"]
        patch = out / label
        if label in done and (patch / "patch.json").exists() and (evaluate is None or "eval" in done[label]):
            rows.append(done[label])
            continue
        spec = base_spec if setting["target"] is None else with_target(base_spec, setting["target"])
        config = StageTConfig(eta=setting["eta"], ridge=ridge, token_role=setting["token_role"] if
                              setting["method"] == "trce" else None, preserve_role=setting["preserve_role"])
        edit = (erase if setting["method"] == "trce" else erase_trce_key)(pipe, spec, config,
                                                                          Context(data_dir=data, progress=False))
        edit.save(patch, config={"sweep": setting, "model": model, "concept": concept}, seeds=None)
        row = {**setting, "patch": str(patch), "info": {k: edit.info[k] for k in (
            "embeddings", "erase_residual", "preserve_drift", "condition")}, "seconds": edit.info["seconds"]["total"]}
        if evaluate is not None:
            row["eval"] = evaluate(patch, setting)
        rows.append(row)
        done[label] = row
        io.write_json(results_path, list(done.values()))
        log.info("%s: residual %.3f, drift %.4f", label, row["info"]["erase_residual"], row["info"]["preserve_drift"])
    return rows


# --------------------------------------------------------------------------- images
EVAL_GROUPS = ("keyword", "synonym", "paraphrase", "preserve")


def image_evaluator(out: str | Path, limit: int, steps: int | None, concept: str = "shapeworld-red",
                    model: str = "shapeworld", device: str | None = None) -> Callable[[Path | None, dict], dict]:
    """`evaluate(patch, setting)` for `sweep`: `trce eval` on the concept's ShapeWorld suite, reduced to the
    groups the table needs (erased value in every form, and the other values of its attribute),
    `limit` prompts per group, the original model's images shared through one reference cache."""
    import yaml

    from trce.eval.options import EvalConfig
    from trce.eval.runner import run_eval
    from trce.eval.suites import builtin_suites

    out = Path(out)
    raw = yaml.safe_load(builtin_suites()[concept].read_text(encoding="utf-8"))
    raw.update(name=f"{raw['name']}-table", groups=list(EVAL_GROUPS))
    suite_file = out / "suite.yaml"
    out.mkdir(parents=True, exist_ok=True)
    io.write_text(suite_file, yaml.safe_dump(raw, sort_keys=False))

    def evaluate(patch: Path | None, setting: dict) -> dict:
        run = out / "eval" / (setting["label"] if patch is not None else "original")
        m = run_eval(EvalConfig(suite=str(suite_file), model=model, patch=str(patch) if patch else None, limit=limit,
                                steps=steps, device=device, reference_cache=str(out / "reference-cache"),
                                progress=False), run)
        def groups(block: dict) -> dict:
            return {g: {"n": v["n"], "asr": v["asr"], "asr_ci": v["asr_ci"], "accuracy": v["accuracy"]}
                    for g, v in block["groups"].items()}

        # The original model's images on the same prompts and seeds come with every patch's evaluation.
        return {"groups": groups(m), "fd": m["fd"], "run": str(run), "reference": {"groups": groups(m["reference"])}}

    return evaluate


def table(rows: list[dict], original: dict) -> str:
    """Markdown: red rate per erasure group, preservation accuracies, with the original model first."""
    head = ("| setting | η | role | keyword | synonym | paraphrase | other colours: colour acc | shape acc | FD |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head]

    def line(label: str, eta: str, role: str, ev: dict) -> str:
        g = ev["groups"]
        rate = " | ".join(f"{100 * g[k]['asr']:.1f}" for k in ("keyword", "synonym", "paraphrase"))
        acc = g["preserve"]["accuracy"]
        fd = "–" if ev.get("fd") is None else f"{ev['fd']:.1f}"
        return f"| {label} | {eta} | {role} | {rate} | {100 * acc['color']:.1f} | {100 * acc['shape']:.1f} | {fd} |"

    lines.append(line("original", "–", "–", original))
    for r in rows:
        lines.append(line(r["method"], f"{r['eta']:g}", r["token_role"], r["eval"]))
    return "\n".join(lines)


# --------------------------------------------------------------------------- a text-only proxy
def _color_prompts(color: str, form: str, group: str, n: int, rng) -> list[str]:
    from trce.shapeworld import world

    style = world.fixed_style(form, group)
    return [world.caption(world.sample_scene(rng, color=color), rng, style) for _ in range(n)]


def embedding_proxy(text_encoder, tokenizer, concept: str = "shapeworld-red", settings: Sequence[dict] = (),
                    n: int = 100, seed: int = 0) -> list[dict]:
    """Judge stage-T settings by the text encoder alone (no UNet, no images): a cheap proxy.

    The edit is W' = W·T for every projection, so the UNet sees T e instead of e. For held-out
    prompts of the erased color (keyword, held-out synonym, held-out paraphrase) and for prompts of
    the other colors, T e at the first [EoT] is classified by the nearest color centroid of the
    ORIGINAL [EoT] embeddings (cosine, after removing the mean): `erased_rate` per group is how
    often it still reads as the erased color, `other_acc` how often other colors keep theirs.
    Only meaningful for color specs; images are the real test (the sweep with `evaluate`).
    """
    import types

    import numpy as np
    import torch

    from trce.methods.closed_form import solve_transform
    from trce.methods.prior import preservation_prior
    from trce.methods.stage_t import pair_embeddings
    from trce.shapeworld import world

    pipe = types.SimpleNamespace(tokenizer=tokenizer, text_encoder=text_encoder)
    base_spec = load_spec(concept)
    colors = world.vocab().values("color")
    erased = base_spec.values[0]
    rng = np.random.default_rng(seed)

    def eot(prompts: list[str]) -> torch.Tensor:
        from trce.tokens import encode, first_eos, tokenize

        ids = tokenize(tokenizer, prompts)
        h = encode(text_encoder, ids).double().cpu()
        return h[torch.arange(len(prompts)), first_eos(ids, tokenizer.eos_token_id)]  # (n, D)

    reference = {c: eot(_color_prompts(c, "keyword", "all", n, rng) + _color_prompts(c, "synonym", "all", n, rng))
                 for c in colors}
    mean = torch.cat(list(reference.values())).mean(0)
    centroids = torch.nn.functional.normalize(torch.stack([r.mean(0) - mean for r in reference.values()]), dim=1)

    def classify(e: torch.Tensor) -> list[str]:
        scores = torch.nn.functional.normalize(e - mean, dim=1) @ centroids.T
        return [colors[i] for i in scores.argmax(1).tolist()]

    tests = {form: eot(_color_prompts(erased, form, "heldout", n, rng)) for form in world.FORMS}
    others = {c: eot(_color_prompts(c, "synonym", "heldout", n // 2, rng) + _color_prompts(c, "keyword", "all",
                                                                                      n // 2, rng))
              for c in colors if c != erased}
    prior_cache: dict = {}
    identity = torch.eye(mean.shape[0], dtype=torch.float64)
    rows = [{"label": "original", **_proxy_scores(classify, tests, others, erased, identity)}]
    for setting in settings:
        spec = base_spec if setting.get("target") is None else with_target(base_spec, setting["target"])
        role = setting["token_role"]
        em, es, _ = pair_embeddings(pipe, spec.pairs(), role, progress=False)
        prompts = spec.preservation_prompts()
        key = setting.get("preserve_role", "all")
        if key not in prior_cache:
            prior_cache[key] = preservation_prior(pipe, prompts, key, fingerprint_id="proxy", use_cache=False,
                                                  progress=False)
        t, diag = solve_transform(em, es, prior_cache[key].cov, setting["eta"],
                                  setting.get("ridge", base_spec.ridge))
        rows.append({"label": setting["label"], **_proxy_scores(classify, tests, others, erased, t),
                     "erase_residual": diag["erase_residual"], "preserve_drift": diag["preserve_drift"]})
    return rows


def _proxy_scores(classify, tests: dict, others: dict, erased: str, t) -> dict:
    out = {f"erased_rate_{form}": sum(c == erased for c in classify(e @ t.T)) / len(e) for form, e in tests.items()}
    hits = [sum(c == color for c in classify(e @ t.T)) / len(e) for color, e in others.items()]
    out["other_acc"] = sum(hits) / len(hits)
    out["other_acc_min"] = min(hits)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/stage-t-sweep")
    p.add_argument("--model", default="shapeworld")
    p.add_argument("--concept", default="shapeworld-red")
    p.add_argument("--etas", default=",".join(map(str, ETAS)))
    p.add_argument("--roles", default=",".join(ROLES))
    p.add_argument("--targets", default=None,
                   help='comma-separated safe targets to compare, e.g. ",blue" ("" = unnamed)')
    p.add_argument("--device", default=None)
    p.add_argument("--eval-limit", type=int, default=None, metavar="N",
                   help="evaluate every patch on N prompts per group of the concept's ShapeWorld suite")
    p.add_argument("--eval-steps", type=int, default=None, help="DDIM steps of the evaluation images (default: suite's)")
    p.add_argument("--proxy", default=None, metavar="CLIP_DIR",
                   help="only the text-encoder proxy (`embedding_proxy`) with the CLIP text model in this folder "
                        "(a trained ShapeWorld run's clip/ folder, or a pipeline's text_encoder/ + tokenizer/)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    targets = tuple(args.targets.split(",")) if args.targets is not None else (None,)
    etas, roles = [float(x) for x in args.etas.split(",")], args.roles.split(",")
    if args.proxy:
        from transformers import CLIPTextModel, CLIPTokenizer

        folder = Path(args.proxy)
        tok_dir = folder / "tokenizer" if (folder / "tokenizer").exists() else folder.parent / "tokenizer"
        text = CLIPTextModel.from_pretrained(folder).eval()
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
        rows = embedding_proxy(text, tokenizer, args.concept, settings_grid(etas, roles, True, targets))
        cols = list(dict.fromkeys(c for r in rows for c in r if c != "label"))
        width = max(len(r["label"]) for r in rows)
        print(f"{'setting':<{width}} " + " ".join(f"{c.replace('erased_rate_', 'red_'):>14}" for c in cols))
        for r in rows:
            print(f"{r['label']:<{width}} " + " ".join(f"{r.get(c, float('nan')):>14.3f}" for c in cols))
        return 0
    evaluate = None
    if args.eval_limit:
        evaluate = image_evaluator(args.out, args.eval_limit, args.eval_steps, args.concept, args.model, args.device)
    rows = sweep(evaluate, model=args.model, concept=args.concept, out=args.out, device=args.device, targets=targets,
                 etas=etas, roles=roles)
    if evaluate is not None:
        text = table(rows, rows[0]["eval"]["reference"])
        io.write_text(Path(args.out) / "table.md", text + "\n")
        print(text)
        return 0
    print(json.dumps([{k: r[k] for k in ("label", "info", "seconds")} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
