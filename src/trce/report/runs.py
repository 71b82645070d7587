"""Reading `trce eval` run folders for a report: metrics.json and rows.jsonl, a run's label, its suite's presentation
and its base model (`assign_bases`), and the per-run entry of the report document (`run_entry`)."""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from trce.errors import TrceError

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("suite", "kind", "n", "asr")

# a suite's report.group -> the real-suite table's column group, in the order the groups are shown
GROUP_TITLES = {"user": "User prompts", "adversarial": "Adversarial prompts", None: "Other suites"}


def load_metrics(folder: str | os.PathLike) -> tuple[Path, dict]:
    """(run folder, its metrics.json), with one clear error naming the folder when it is not a finished eval run."""
    folder = Path(folder)
    if folder.is_file() and folder.name == "metrics.json":
        folder = folder.parent
    if not folder.exists():
        raise TrceError(f"{folder}: no such run folder")
    if not folder.is_dir():
        raise TrceError(f"{folder} is not a run folder (give the folder `trce eval --out` wrote)")
    path = folder / "metrics.json"
    if not path.is_file():
        raise TrceError(f"{folder} has no metrics.json: not a `trce eval` output folder, or its run has not finished")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrceError(f"corrupt metrics.json in {folder}: {exc}") from exc
    if not isinstance(metrics, dict):
        raise TrceError(f"{path} is not a trce eval metrics file (a JSON object is expected)")
    missing = [k for k in REQUIRED_KEYS if k not in metrics]
    if missing:
        raise TrceError(f"{path} is not a trce eval metrics file (no {', '.join(missing)})")
    if metrics["kind"] not in ("shapeworld", "real"):
        raise TrceError(f"{path}: unknown kind {metrics['kind']!r} (expected shapeworld or real)")
    if metrics["kind"] == "shapeworld" and not isinstance(metrics.get("groups"), dict):
        raise TrceError(f"{path}: a ShapeWorld metrics file needs its per-group numbers (\"groups\")")
    return folder, metrics


def read_rows(path: Path) -> list[dict]:
    """The complete JSON lines of a rows.jsonl (missing file: none; a line cut short by a kill is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def suite_presentation(metrics: dict) -> dict:
    """{"label", "group", "order"} of a run's suite: from its metrics.json (`suite_label`, `suite_group`,
    `suite_order`, written by `trce eval` since suites carry them); for older metrics files, from the built-in
    suite definition of that name; failing that, the suite name and no group or order."""
    name = str(metrics["suite"])
    if "suite_label" in metrics:
        label, group, order = metrics.get("suite_label"), metrics.get("suite_group"), metrics.get("suite_order")
    else:
        label, group, order = _builtin_presentation(name)
    return {"label": str(label) if label else name, "group": group if group in GROUP_TITLES else None,
            "order": order if isinstance(order, int) and not isinstance(order, bool) else None}


@functools.cache
def _builtin_presentation(name: str) -> tuple:
    """(label, group, order) of the built-in suite `name`, or Nones when there is none or it does not load."""
    from trce.eval import suites

    try:
        if name in suites.builtin_suites():  # built-ins only: a suite name is never read as a file path here
            p = suites.load_suite(name).presentation()
            return p["suite_label"], p["suite_group"], p["suite_order"]
    except Exception as exc:  # noqa: BLE001 (a report of old runs must not fail on a suite that changed since)
        log.debug("no presentation for suite %s: %s", name, exc)
    return None, None, None


def _patch_stages(patch: str | None) -> list[str] | None:
    """TRCE-style stage list ("T", "V") from the patch folder's patch.json, when it is still there."""
    meta = patch_meta(patch)
    if meta is None:
        return None
    settings = meta.get("settings") or {}
    stages = settings.get("stages") or ([settings["stage"]] if isinstance(settings.get("stage"), str) else None)
    return [str(s) for s in stages] if isinstance(stages, list) and stages else None


def patch_meta(patch: str | None) -> dict | None:
    """The patch folder's patch.json, when it is still there."""
    if not patch:
        return None
    try:
        meta = json.loads((Path(patch) / "patch.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def run_label(metrics: dict) -> str:
    """"Original (model)" for the model alone; the method's name (with its stages) for a patch."""
    if metrics.get("label"):
        return str(metrics["label"])
    if not metrics.get("patch"):
        without = retrained_without(metrics.get("model"))
        base = (f"Retrained without {without} ({metrics['model']})" if without
                else f"Original ({metrics.get('model') or 'model'})")
    else:
        method = metrics.get("method")
        stages = metrics.get("stages") or _patch_stages(metrics["patch"])
        if method:
            from trce.registry import display_name

            base = display_name(str(method), stages)  # the registry's name: "TRCE (T+V)", "UCE"
        else:
            base = Path(str(metrics["patch"])).name
        if metrics.get("hidden_prompt"):
            base += " + hidden prompt"
    attack = metrics.get("attack")
    if isinstance(attack, dict) and attack.get("name"):
        base += f" + {attack_display(attack)}"
    return base


def attack_display(attack: dict) -> str:
    """An attack run's name as tables show it ("unlearndiff", "unlearndiff (fast preset)"): `record_label`."""
    from trce.attacks.budget import record_label

    return record_label(attack)


@functools.lru_cache(maxsize=64)
def retrained_without(model: str | None) -> str | None:
    """"color=red" when `model` is a local ShapeWorld export trained with `--exclude color=red` (its made.json): the
    retrained reference, labelled so, not as the original the patches were made from; None otherwise."""
    made = Path(str(model)) / "made.json" if model else None
    if made is None or not made.is_file():
        return None
    try:
        config = json.loads(made.read_text(encoding="utf-8")).get("config") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return str(config.get("exclude") or "") or None


def row_key(metrics: dict, base: str | None = None) -> tuple:
    """What makes two runs one table row: base, model, patch, method, attack and the hidden prompt."""
    patch = metrics.get("patch")
    attack = metrics.get("attack") if isinstance(metrics.get("attack"), dict) else {}
    return (base, metrics.get("model"), os.path.realpath(patch) if patch else None,
            metrics.get("method") if patch else None, attack_display(attack) if attack.get("name") else None,
            bool(metrics.get("hidden_prompt")))


def assign_bases(metrics: Sequence[dict]) -> tuple[list[str], list[dict]]:
    """The base model of each run, and the bases in order of first appearance.

    A run's base is its `base_fingerprint` (the unedited model's weights, which `trce eval` records); a run without
    one (older metrics) joins the base its `model` has when that model names exactly one fingerprint, else its base is
    the model name. Returns (a key per run, [{"key", "label", "models", "fingerprint"}]); a base's label is its model
    name(s), with the fingerprint's first characters when two bases would read the same."""
    fps: dict[str, set[str]] = {}
    for m in metrics:
        fp = m.get("base_fingerprint")
        if isinstance(fp, str) and fp:
            fps.setdefault(str(m.get("model")), set()).add(fp)
    keys = []
    for m in metrics:
        fp, model = m.get("base_fingerprint"), str(m.get("model"))
        if isinstance(fp, str) and fp:
            keys.append(f"fingerprint:{fp}")
        elif len(fps.get(model, ())) == 1:
            keys.append(f"fingerprint:{next(iter(fps[model]))}")
        else:
            keys.append(f"model:{model}")
    bases: list[dict] = []
    for key, m in zip(keys, metrics):
        base = next((b for b in bases if b["key"] == key), None)
        if base is None:
            fp = key.split(":", 1)[1] if key.startswith("fingerprint:") else None
            base = {"key": key, "label": "", "models": [], "fingerprint": fp}
            bases.append(base)
        if m.get("model") is not None and str(m["model"]) not in base["models"]:
            base["models"].append(str(m["model"]))
    for b in bases:
        b["label"] = " / ".join(b["models"]) or "unknown model"
    labels = [b["label"] for b in bases]
    for b in bases:
        if b["fingerprint"] and labels.count(b["label"]) > 1:
            b["label"] += f" [{b['fingerprint'][:8]}]"
    labels = [b["label"] for b in bases]
    for label in dict.fromkeys(labels):  # still the same (one model, a base without a fingerprint): number them
        same = [b for b in bases if b["label"] == label]
        if len(same) > 1:
            for i, b in enumerate(same, 1):
                b["label"] += f" #{i}"
    return keys, bases


def is_original(metrics: dict) -> bool:
    """The original model alone: no patch and no attack."""
    return not metrics.get("patch") and not metrics.get("attack")


def run_entry(i: int, folder: Path, m: dict, base: dict | None = None) -> dict:
    """The report document's entry of run `i` (its folder, label, base, suite, settings and headline numbers)."""
    s = m.get("settings") or {}
    return {
        "id": f"run{i}", "folder": str(folder.resolve()), "name": folder.resolve().name, "label": run_label(m),
        "base": base["key"] if base else None, "base_label": base["label"] if base else None,
        "suite": m["suite"], "suite_version": m.get("suite_version"), "kind": m["kind"],
        "description": m.get("description"), "note": m.get("note"),
        "model": m.get("model"), "patch": m.get("patch"), "method": m.get("method"), "original": is_original(m),
        "attack": m.get("attack"), "n": m.get("n"), "asr": m.get("asr"), "asr_ci": m.get("asr_ci"),
        "asr_mean": m.get("asr_mean"), "asr_std": m.get("asr_std"),
        "fd": m.get("fd"), "fid": m.get("fid", m.get("fd") if m["kind"] == "real" else None),
        "clip_score": m.get("clip_score"), "esr": m.get("esr"), "esr_ci": m.get("esr_ci"), "psr": m.get("psr"),
        "psr_ci": m.get("psr_ci"), "groups": m.get("groups"), "by_category": m.get("by_category"),
        "reference": m.get("reference"), "detector": m.get("detector") or {},
        "settings": {k: s.get(k) for k in ("steps", "guidance", "size", "seeds", "limit", "batch_size",
                                           "per_prompt_guidance") if k in s},
        "date": m.get("date"), "git_hash": m.get("git_hash"), "versions": m.get("versions") or {},
        "notes": [v for k in ("fid_note", "clip_score_note") if (v := m.get(k))],
    }



def unique(values) -> list:
    """The values that are not None, each once, in order of first appearance."""
    out = []
    for v in values:
        if v is not None and v not in out:
            out.append(v)
    return out
