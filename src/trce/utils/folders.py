"""What an output folder holds: its kind and its key, so that no command writes over another run's results.

Every folder a trce command writes declares its kind:

    kind       declared by                       written by
    patch      patch.json                        `trce erase`, `Edit.save`
    export     trce-export.json / made.json      `trce export`, `trce shapeworld export`
    eval       trce.json {"kind": "eval", ...}   `trce eval`, `trce.evaluate`
    attack     trce.json {"kind": "attack", ...} `trce attack`, `trce.attack`
    training   train.json                        `trce shapeworld train`
    demo       trce.json {"kind": "demo", ...}   `trce demo`

A command refuses a folder of another kind ("E is an eval folder; attack results go elsewhere") and, for run
folders that resume (eval, attack), a folder of the same kind whose key (the settings its results depend on)
differs. Folders written before the manifest existed are recognised by their files (`eval.json`,
`attack.json`): their key is adopted, and a setting the old key did not record is not compared.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from trce.errors import TrceError
from trce.utils import io

MANIFEST = "trce.json"
FORMAT = "trce-folder"
VERSION = 1

# kind -> (what such folders hold, for messages; marker files that declare it without a manifest)
KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "patch": ("patches", ("patch.json",)),
    "export": ("exported pipelines", ("trce-export.json", "made.json", "model_index.json")),
    "eval": ("evaluation results", ("eval.json",)),
    "attack": ("attack results", ("attack.json",)),
    "training": ("training runs", ("train.json",)),
    "demo": ("demo runs", ("run.json",)),
}
_LEGACY_KEY = {"eval": "eval.json", "attack": "attack.json"}  # where folders before the manifest kept their key
MANIFEST_KINDS = ("eval", "attack", "demo")  # the kinds trce.json declares (the others have their own files)
# kinds whose folder is wholly their command's: nothing else is written inside one (a demo folder is a container
# of patch and eval folders, and takes them)
OWNING = ("patch", "export", "eval", "attack", "training")


def _name(kind: str) -> str:
    return {"eval": "an eval", "attack": "an attack", "export": "an export"}.get(kind, f"a {kind}")


def manifest(folder: str | os.PathLike) -> dict | None:
    """The folder's manifest (trce.json), or None when it has none; one that is not ours is an error."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = io.read_json(path)
    except (OSError, ValueError, TrceError) as exc:
        raise TrceError(f"{path} cannot be read ({exc}); it is not a trce folder manifest: choose another folder",
                        field="out") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("kind") not in MANIFEST_KINDS:
        raise TrceError(f"{path} is not a trce folder manifest; choose another folder", field="out")
    return data


def kind_of(folder: str | os.PathLike) -> str | None:
    """The kind a folder declares (its manifest, else its marker files), None for a missing or unmarked folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    data = manifest(folder)
    if data is not None:
        return data["kind"]
    for kind, (_, markers) in KINDS.items():
        if any((folder / m).is_file() for m in markers):
            return kind
    return None


def _foreign(folder: Path) -> list[str]:
    """Visible entries of a folder that declares no kind (hidden files such as lock files are left alone)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def check(folder: str | os.PathLike, kind: str, field: str = "out") -> None:
    """Refuse, before any work, writing results of `kind` into `folder` when it holds something else: a folder of
    another kind, or a folder with files trce did not write. A missing or empty folder, or one of `kind`, is fine."""
    if kind not in KINDS:
        raise ValueError(f"unknown folder kind {kind!r}")
    check_outside(folder, field)
    io.check_path(folder, field)  # a name too long or a loop of links: one clear line, not an OSError
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise TrceError(f"{field} {folder} is a file, not a folder; give a folder path", field=field)
    if not path.is_dir():
        return
    have = kind_of(path)
    if have == kind:
        return
    if have is not None:
        raise TrceError(f"{field} {folder} is {_name(have)} folder (it holds {KINDS[have][0]}); {KINDS[kind][0]} go "
                        "elsewhere: choose another folder", field=field)
    foreign = _foreign(path)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise TrceError(f"{field} {folder} exists and holds files trce did not write ({shown}); choose a new or "
                        "empty folder", field=field)


def check_outside(path: str | os.PathLike, field: str = "out") -> None:
    """Refuse an output inside another run's folder (a patch, export, eval, attack or training run): that command
    owns everything in it, and replaces or rewrites it (`trce erase` makes a patch folder anew)."""
    here = Path(os.path.abspath(os.path.expanduser(path)))
    for folder in here.parents:
        if folder.is_dir():
            kind = kind_of(folder)
            if kind in OWNING:
                raise TrceError(f"{field} {path} is inside {folder}, {_name(kind)} folder (it holds {KINDS[kind][0]}, "
                                f"and its command owns all of it): choose a place outside it", field=field)


def claim(folder: str | os.PathLike, kind: str, key: dict, state=None, field: str = "out") -> None:
    """Check `folder` (`check`), then its key: a folder of `kind` made with another key is refused; the first run
    writes the manifest. Under several processes only the main one writes, after all have checked."""
    folder = Path(folder)
    check(folder, kind, field)
    old = _recorded_key(folder, kind)
    if old is not None and not [n for n in _foreign(folder) if n != MANIFEST]:
        old = None  # a folder a refused run left with its manifest only: nothing made with the old key
    if old is not None:
        recorded, legacy = old
        fields = set(recorded) | set(key)
        if legacy:  # a folder from before the manifest: settings it did not record are not compared
            fields &= set(recorded)
        diff = sorted(k for k in fields if not _same(recorded.get(k), key.get(k)))
        if diff:
            run = {"eval": "an evaluation", "attack": "an attack"}.get(kind, _name(kind))
            raise TrceError(f"{folder} holds {run} made with other {', '.join(diff)}; use another "
                            f"--{field} or delete that folder", field=field)
    if state is not None:
        state.wait_for_everyone()
    if (state is None or state.is_main_process) and (old is None or old[1] or not _same(old[0], key)):
        declare(folder, kind, key)


def declare(folder: str | os.PathLike, kind: str, key: dict | None = None) -> None:
    """Write `folder`'s manifest (atomically): its kind and the key its results depend on."""
    from trce.version import __version__

    Path(folder).mkdir(parents=True, exist_ok=True)
    io.write_json(Path(folder) / MANIFEST, {"format": FORMAT, "version": VERSION, "kind": kind,
                                            "key": key or {}, "trce": __version__})


def _recorded_key(folder: Path, kind: str) -> tuple[dict, bool] | None:
    """(the key `folder` records, whether it comes from a folder written before the manifest), or None."""
    data = manifest(folder)
    if data is not None:
        return dict(data.get("key") or {}), False
    legacy = _LEGACY_KEY.get(kind)
    if legacy and (folder / legacy).is_file():
        try:
            return dict(io.read_json(folder / legacy).get("key") or {}), True
        except (OSError, ValueError, AttributeError):
            return {}, True
    return None


def _same(a, b) -> bool:
    """Equal once written as JSON (tuples and lists alike)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)
