"""`--ship`: the package's ShapeWorld weights (the pipeline, and the detector every evaluation judges with) change
only through a deliberate ship: a full-size model (not --tiny), one that saw every value (not --exclude), that passes
the quality bar of `trce shapeworld check` (judged by the shipped detector) and, for sd1, whose own detector reads
fresh renders; the folder it replaces is kept beside it, hidden (".weights.backup-<UTC time>", outside the package
data). `ship_weights` ships ShapeWorld's pipeline; `trce.shapeworld.miniatures.ship` a miniature's denoiser, through
the same steps (`recorded_config`, `check_ship_args`, `ship_checked`)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from trce.errors import TrceError
from trce.shapeworld.training import TrainConfig, detector_accuracy, torch_device
from trce.utils import io

log = logging.getLogger(__name__)

SHIP_CHECK_N = 600  # images of the ship's quality check: the bar of test_shapeworld_quality (DDIM 30, guidance 7.5)
DETECTOR_BAR = 0.97  # per-attribute agreement of a shipped detector with fresh renders (test_shipped_detector_...)
DETECTOR_CHECK_N = 2000  # fresh renders the detector is checked on (as many as the detector stage checks it on)


@dataclass
class Shipped:
    """Where a ship installed the weights, where the folder it replaced was kept (None: there was none), and the
    quality check the model passed."""

    dest: Path
    backup: Path | None
    check: dict


def check_ship_args(*, tiny: bool = False, exclude: str | None = None, dest: Path | None = None) -> None:
    """Refuse, before any training, a `--ship` that must not replace the package's weights."""
    if tiny:
        raise TrceError("--ship refuses --tiny: a smoke-test model never replaces the shipped ShapeWorld weights "
                        "(the pipeline and the detector every evaluation uses); drop --ship or --tiny", field="ship")
    if exclude:
        raise TrceError(f"--ship refuses --exclude {exclude}: a model that never saw {exclude} is the retrained "
                        "reference of an erasure, not the shipped ShapeWorld model; drop --ship and pass its export "
                        "folder as --model", field="ship")
    if dest is not None:
        io.check_writable(dest, "ship", replace=True)


def quality_check(pipe, *, n: int, what: str) -> dict:
    """`trce shapeworld check` on `pipe` (judged by the shipped detector); refused with one line naming the groups
    below the bar when it fails."""
    from trce.shapeworld import weights_dir
    from trce.shapeworld.check import BAR, format_table, run_check

    if not (weights_dir() / "detector" / "detector.json").is_file():
        raise TrceError(f"--ship refused: no shipped ShapeWorld detector in {weights_dir() / 'detector'} to judge "
                        f"{what} with; reinstall trce", field="ship")
    log.info("checking %s against the ShapeWorld quality bar (%d images) before installing it", what, n)
    result = run_check(pipe, n=n, progress=True)
    log.info("quality check of %s:\n%s", what, format_table(result))
    if not result["passed"]:
        low = [f"{g} {a} {row[a]:.2f} < {BAR[g]:.2f}" for g, row in result["groups"].items() for a in ("color", "shape")
               if row[a] < BAR[g]]
        raise TrceError(f"--ship refused: {what} does not pass the ShapeWorld quality bar ({'; '.join(low)}); "
                        "nothing was installed", field="ship")
    return result


def check_detector(folder: Path, device: str = "cpu") -> dict[str, float]:
    """The per-attribute agreement of the detector in `folder` with fresh renders; refused below DETECTOR_BAR."""
    from trce.shapeworld import detector

    acc = detector_accuracy(detector(folder, device=str(torch_device(device))), seed=2024, n=DETECTOR_CHECK_N,
                            device=torch_device(device))
    low = [f"{a} {v:.3f}" for a, v in acc.items() if v < DETECTOR_BAR]
    if low:
        raise TrceError(f"--ship refused: the detector in {folder} agrees with fresh renders below {DETECTOR_BAR} "
                        f"({', '.join(low)}); nothing was installed", field="ship")
    return acc


def install(export: Path, dest: Path, shipped: dict) -> tuple[Path, Path | None]:
    """Copy `export` into `dest` as a whole (its made.json gets `shipped`); the folder it replaces is renamed to a
    hidden timestamped sibling, kept. Returns (dest, the backup or None)."""
    import datetime as dt
    import os
    import shutil
    import tempfile

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    backup = None
    try:
        shutil.copytree(export, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("DONE"))
        made = io.read_json(tmp / "made.json") if (tmp / "made.json").is_file() else {}
        io.write_json(tmp / "made.json", {**made, "shipped": shipped})
        mask = os.umask(0)
        os.umask(mask)
        for sub in [tmp, *tmp.rglob("*")]:
            if not sub.is_symlink():
                os.chmod(sub, (0o777 if sub.is_dir() else 0o666) & ~mask)
        if dest.exists():
            stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            backup = dest.with_name(f".{dest.name}.backup-{stamp}")
            k = 1
            while backup.exists():
                k += 1
                backup = dest.with_name(f".{dest.name}.backup-{stamp}-{k}")
            os.replace(dest, backup)
            try:
                os.replace(tmp, dest)
            except OSError:
                os.replace(backup, dest)  # put the old weights back: nothing changed
                raise
        else:
            os.replace(tmp, dest)
    except OSError as exc:
        raise TrceError(f"--ship could not install {export} into {dest}: {exc}", field="ship") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("installed %s into %s%s", export, dest, f"; the weights it replaced are in {backup}" if backup else "")
    return dest, backup


def recorded_config(export: Path, dest: Path) -> dict:
    """The training config `export` records in its made.json ({} without one); refused when `export` is the shipped
    folder `dest` itself."""
    if export.resolve() == dest.resolve():
        raise TrceError(f"--ship: {export} is the shipped folder itself", field="ship")
    return (io.read_json(export / "made.json") if (export / "made.json").is_file() else {}).get("config") or {}


def recorded_tiny(config: dict, tiny: dict, keys: tuple[str, ...]) -> bool:
    """True when a recorded training `config` has the `keys` of the `tiny` configuration (whatever seed and device)."""
    return bool(config) and all(config.get(k) == tiny[k] for k in keys)


def ship_checked(export: Path, dest: Path, load, *, n: int | None = None, checked: dict | None = None) -> Shipped:
    """The last steps of every ship: the pipeline `load()` returns through the quality bar (`quality_check`), then
    `export` installed into `dest` (`install`), its record naming what else was `checked` before."""
    pipe = load()
    result = quality_check(pipe, n=SHIP_CHECK_N if n is None else n, what=str(export))
    del pipe
    shipped = {"date": io.run_record()["date"], "from": str(export.resolve()), **(checked or {}),
               "quality_check": result}
    dest, backup = install(export, dest, shipped)
    return Shipped(dest, backup, result)


def ship_weights(export: Path, *, device: str = "auto", n: int | None = None, dest: Path | None = None) -> Shipped:
    """Install an exported pipeline as the package's shipped ShapeWorld weights (`dest`: the package's folder),
    after refusing one trained with --exclude or recorded as a tiny run, one whose detector misreads fresh renders
    or that fails the quality bar; the replaced folder is kept (see `install`)."""
    from trce.loading import load_pipeline
    from trce.shapeworld import weights_dir

    export = Path(export)
    dest = Path(dest) if dest is not None else weights_dir()
    config = recorded_config(export, dest)
    tiny = recorded_tiny(config, asdict(TrainConfig.tiny()),
                         ("pool_size", "clip_steps", "vae_steps", "detector_steps", "unet_steps", "unet_batch"))
    check_ship_args(tiny=tiny, exclude=config.get("exclude"), dest=dest)
    detector_acc = check_detector(export / "detector", device)
    return ship_checked(export, dest, lambda: load_pipeline(str(export), device=device), n=n,
                        checked={"detector_accuracy": detector_acc})
