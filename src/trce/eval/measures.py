"""metrics.json's numbers from a run's rows (`compute_metrics`): per group (ShapeWorld suites) or per category (real
suites) rates with Wilson intervals, accuracy, CLIP score and the Fréchet distance to the reference images, per seed
offset and pooled over them."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from trce.eval import metrics as M
from trce.eval.detectors import Detector
from trce.eval.options import EvalOptions
from trce.eval.rows import IMAGES, REFERENCE, ROWS
from trce.eval.suites import ERASURE_GROUPS, Suite

log = logging.getLogger(__name__)


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
