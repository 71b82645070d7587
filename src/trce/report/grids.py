"""The report's image grids (`image_grids`): before/after image pairs on the same prompts and seeds, N prompts per
group picked deterministically (evenly spaced over the group's rows)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from trce.report.runs import read_rows

log = logging.getLogger(__name__)


def _pick(n_items: int, k: int) -> list[int]:
    """k indices evenly spaced over range(n_items), first and last included (deterministic)."""
    if k <= 0 or n_items <= 0:
        return []
    if k >= n_items:
        return list(range(n_items))
    if k == 1:
        return [0]
    return sorted({round(i * (n_items - 1) / (k - 1)) for i in range(k)})


def _images_dir(folder: Path, m: dict) -> Path:
    return folder / (m.get("images_dir") or "images")


def _own_reference(folder: Path, m: dict) -> tuple[Path, list[dict]] | None:
    ref = m.get("reference_dir")
    ref_dir = folder / ref if ref else folder / "reference" / "images"
    if not ref_dir.is_dir():
        return None
    return ref_dir, read_rows(ref_dir.parent / "rows.jsonl")


def _group_of(row: dict) -> str:
    if row.get("group"):
        return str(row["group"])
    cats = row.get("categories") or []
    return str(cats[0]) if cats else "all"


def _image_entry(images: Path, row: dict, kind: str, attribute: str | None, values: Sequence[str]) -> dict:
    name = row.get("name") or f"{int(row['index']):05d}"
    path = images / f"{name}.png"
    verdict = row.get("verdict")
    entry = {"image": str(path) if path.is_file() else None, "verdict": verdict,
             # a real-suite image the detector judged unsafe is blurred unless the user turns it off
             "unsafe": bool(kind == "real" and verdict is True)}
    top1 = (row.get("scores") or {}).get("top1") if isinstance(row.get("scores"), dict) else None
    if kind == "shapeworld" and attribute and isinstance(top1, dict):
        entry["detected"] = top1.get(attribute)
        entry["erased_value"] = top1.get(attribute) in values
    if kind == "real" and isinstance(row.get("scores"), dict) and row["scores"].get("exposed"):
        entry["detected"] = ", ".join(str(c) for c in row["scores"]["exposed"])
    if entry["image"] is None:
        log.warning("missing image %s", path)
    return entry


def image_grids(loaded: list[tuple[dict, Path, dict]], grid_size: int) -> list[dict]:
    grids = []
    if grid_size <= 0:
        return grids
    for run, folder, m in loaded:
        patched_same_suite = any(not r["original"] and r["suite"] == run["suite"] and r["base"] == run["base"]
                                 for r, _, _ in loaded)
        if run["original"] and patched_same_suite:
            continue  # it appears as the reference column of the patched runs
        rows = read_rows(folder / (m.get("rows") or "rows.jsonl"))
        if not rows:
            log.info("%s: no rows.jsonl, so no image grid", folder)
            continue
        detector = m.get("detector") or {}
        attribute, values = detector.get("attribute"), list(detector.get("values") or [])
        images = _images_dir(folder, m)
        ref_source, ref_images, ref_rows = None, None, {}
        if not run["original"]:
            own = _own_reference(folder, m)
            if own is not None and own[1]:
                ref_images, ref_list = own
                ref_source = "reference images generated with this run"
                ref_rows = {(r.get("prompt"), r.get("seed")): r for r in ref_list}
            else:
                for r2, f2, m2 in loaded:
                    if r2["original"] and r2["suite"] == run["suite"] and r2["base"] == run["base"]:
                        ref_images = _images_dir(f2, m2)
                        ref_rows = {(r.get("prompt"), r.get("seed")): r for r in read_rows(f2 / (m2.get("rows")
                                                                                               or "rows.jsonl"))}
                        ref_source = f"the original model's run {r2['name']}"
                        break
        by_group: dict[str, list[dict]] = {}
        common = None
        if m["kind"] == "real":  # a category every row has (I2P's "sexual" rows) makes one group, not many
            cats = [set(r.get("categories") or []) for r in rows]
            shared = set.intersection(*cats) if cats else set()
            common = next((c for c in (rows[0].get("categories") or []) if c in shared), None)
        for r in sorted(rows, key=lambda r: r.get("index", 0)):
            by_group.setdefault(common or _group_of(r), []).append(r)
        order = [g for g in (m.get("groups") or {}) if g in by_group] + [g for g in by_group
                                                                          if g not in (m.get("groups") or {})]
        groups = []
        for g in order:
            members = by_group[g]
            items = []
            for i in _pick(len(members), grid_size):
                r = members[i]
                item = {"index": r.get("index"), "prompt": r.get("prompt"), "seed": r.get("seed"),
                        "guidance": r.get("guidance"),
                        "after": _image_entry(images, r, m["kind"], attribute, values), "before": None}
                ref = ref_rows.get((r.get("prompt"), r.get("seed")))
                if ref is not None and ref_images is not None:
                    item["before"] = _image_entry(ref_images, ref, m["kind"], attribute, values)
                items.append(item)
            groups.append({"name": g, "total": len(members), "items": items})
        grids.append({"run": run["id"], "label": run["label"], "suite": run["suite"], "kind": m["kind"],
                      "original": run["original"], "attribute": attribute, "values": values,
                      "reference": ref_source, "groups": groups})
    return grids
