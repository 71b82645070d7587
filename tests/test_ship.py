"""`trce shapeworld train --ship`: the package's ShapeWorld weights change only through a deliberate ship.

Nothing here writes into the installed package: the ship destination (`trce.shapeworld.weights_dir`, and
`trce.shapeworld.pipelines.miniature_dir` for the miniatures) is pointed at a copy in a tmp folder, and a test fails if the real folder changes.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

import trce
import trce.shapeworld
import trce.shapeworld.ship as ship_mod
import trce.shapeworld.train as train_mod
from trce.errors import TrceError
from trce.shapeworld import miniatures, pipelines

SHIPPED = trce.shapeworld.weights_dir()


def _listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture(autouse=True)
def package_untouched():
    """The real package folder holds the same files, unchanged, after every test (no backups beside it either)."""
    siblings = sorted(p.name for p in SHIPPED.parent.iterdir())
    before = _listing(SHIPPED)
    yield
    assert _listing(SHIPPED) == before
    assert sorted(p.name for p in SHIPPED.parent.iterdir()) == siblings


@pytest.fixture()
def dest(tmp_path, monkeypatch) -> Path:
    """A copy of the shipped weights standing in for the package's folder (the judge's detector comes from it too)."""
    folder = tmp_path / "pkg" / "weights"
    shutil.copytree(SHIPPED, folder)
    monkeypatch.setattr(trce.shapeworld, "weights_dir", lambda: folder)
    monkeypatch.setattr(pipelines, "miniature_dir", lambda family: tmp_path / "pkg" / f"weights-{family}")
    return folder


@pytest.fixture()
def no_training(monkeypatch):
    """Any training that starts fails the test: refusals come before it."""
    def refuse(*args, **kwargs):
        pytest.fail("training started")

    monkeypatch.setattr(train_mod.Trainer, "__init__", refuse)
    monkeypatch.setattr(miniatures.MiniatureTrainer, "__init__", refuse)


# --------------------------------------------------------------------------- refusals before training
@pytest.mark.parametrize("extra, words", [
    (["--tiny"], "--ship refuses --tiny"),
    (["--exclude", "color=red"], "--ship refuses --exclude color=red"),
    (["--tiny", "--exclude", "color=red", "--warm-start", "shapeworld"], "--ship refuses --tiny"),
    (["--family", "sdxl", "--tiny"], "--ship refuses --tiny"),
    (["--family", "sd3", "--exclude", "color=red"], "--ship refuses --exclude"),
])
def test_ship_refuses_tiny_and_exclude_before_training(extra, words, run_cli, tmp_path, dest, no_training):
    before = _listing(dest)
    out = tmp_path / "run"
    code, stdout, err = run_cli("shapeworld", "train", "--out", out, "--ship", *extra)
    assert code == 2 and err.startswith(f"trce: error: {words}") and err.count("\n") == 1, err
    assert not out.exists() and stdout == ""  # nothing left behind
    assert _listing(dest) == before and sorted(p.name for p in dest.parent.iterdir()) == ["weights"]


def test_the_library_refuses_the_same(tmp_path, dest, no_training):
    with pytest.raises(TrceError, match="refuses --tiny"):
        train_mod.train(tmp_path / "a", tiny=True, ship=True)
    with pytest.raises(TrceError, match="refuses --exclude color=red"):
        train_mod.train(tmp_path / "b", ship=True, exclude="color=red")
    with pytest.raises(TrceError, match="refuses --tiny"):
        miniatures.train_miniature(tmp_path / "c", "sdxl", tiny=True, ship_it=True)
    assert not any((tmp_path / n).exists() for n in "abc")


def test_training_into_the_package_is_refused(run_cli, no_training):
    inside = Path(trce.__file__).resolve().parent / "shapeworld" / "weights" / "run"
    code, _, err = run_cli("shapeworld", "train", "--out", inside, "--tiny")
    assert code == 2 and "inside the installed trce package" in err
    assert not inside.exists()


# --------------------------------------------------------------------------- refusals after training
def _checked(synonym_color: float, seen: list | None = None):
    """A stand-in for `run_check` (the real one takes minutes; test_shapeworld_quality runs it): its result with
    every group right but synonym colours, drawn right `synonym_color` of the time."""
    from trce.shapeworld import check

    def run_check(pipe, n=600, **kwargs):
        if seen is not None:
            seen.append((pipe, n))
        groups = {g: {"n": n // len(check.GROUPS), "color": 1.0, "shape": 1.0, "pattern": 1.0, "background": 1.0}
                  for g in check.GROUPS}
        groups["synonym"]["color"] = synonym_color
        passed = all(groups[g][a] >= check.BAR[g] for g in check.GROUPS for a in ("color", "shape"))
        return {"groups": groups, "passed": passed, "eot_keyword_cosine": {"mean": 0.1, "red": 0.1}, "seconds": 1.0}

    return run_check


def _export(tmp_path: Path, config: dict) -> Path:
    """An export folder: the shipped weights with `config` recorded as its training settings."""
    export = tmp_path / "run" / "export"
    shutil.copytree(SHIPPED, export)
    made = json.loads((export / "made.json").read_text())
    (export / "made.json").write_text(json.dumps({**made, "config": config}))
    return export


FULL = {**asdict(train_mod.TrainConfig()), "warm_start": "shapeworld"}


def test_a_recorded_tiny_or_exclude_export_is_refused(tmp_path, dest):
    before = _listing(dest)
    with pytest.raises(TrceError, match="refuses --tiny"):
        ship_mod.ship_weights(_export(tmp_path / "t", asdict(train_mod.TrainConfig.tiny(seed=3))))
    with pytest.raises(TrceError, match="refuses --exclude color=red"):
        ship_mod.ship_weights(_export(tmp_path / "x", {**FULL, "exclude": "color=red"}))
    assert _listing(dest) == before


def test_a_detector_that_misreads_renders_is_refused(tmp_path, dest, monkeypatch):
    from trce.shapeworld import models
    from trce.utils import io

    monkeypatch.setattr(ship_mod, "DETECTOR_CHECK_N", 64)
    export = _export(tmp_path, FULL)
    det = models.AttributeClassifier(models.DetectorConfig.default())  # untrained: a guess
    io.save_tensors(export / "detector" / "detector.safetensors", det.state_dict())
    before = _listing(dest)
    with pytest.raises(TrceError, match=r"detector in .* agrees with fresh renders below 0.97.*nothing was installed"):
        ship_mod.ship_weights(export, device="cpu")
    assert _listing(dest) == before and sorted(p.name for p in dest.parent.iterdir()) == ["weights"]


def test_a_model_below_the_quality_bar_is_refused(tmp_path, dest, monkeypatch):
    from trce.shapeworld import check

    monkeypatch.setattr(ship_mod, "DETECTOR_CHECK_N", 64)
    monkeypatch.setattr(check, "run_check", _checked(synonym_color=0.5))
    before = _listing(dest)
    with pytest.raises(TrceError, match=r"does not pass the ShapeWorld quality bar \(synonym color 0.50 < 0.85\)"):
        ship_mod.ship_weights(_export(tmp_path, FULL), device="cpu")
    assert _listing(dest) == before and sorted(p.name for p in dest.parent.iterdir()) == ["weights"]


# --------------------------------------------------------------------------- a deliberate ship
def test_a_ship_checks_installs_and_keeps_a_backup(tmp_path, dest, monkeypatch, run_cli):
    """End to end through the CLI (training stubbed: the run's export is the shipped model under another config)."""
    from trce.shapeworld import check

    seen: list = []
    monkeypatch.setattr(ship_mod, "DETECTOR_CHECK_N", 64)
    monkeypatch.setattr(check, "run_check", _checked(synonym_color=0.9, seen=seen))
    export = _export(tmp_path, FULL)
    (export / "DONE").write_text("{}")
    (dest / "old-marker").write_text("the weights before")

    class Done:
        def __init__(self, out, cfg):
            assert not cfg.exclude and cfg.pool_size == FULL["pool_size"]

        def run(self):
            return export

    monkeypatch.setattr(train_mod, "Trainer", Done)
    code, stdout, err = run_cli("shapeworld", "train", "--out", tmp_path / "run", "--warm-start", "shapeworld",
                                "--device", "cpu", "--ship")
    assert code == 0, err
    (pipe, n), = seen  # the exported pipeline was checked, on the quality bar's 600 images, before installing
    assert n == ship_mod.SHIP_CHECK_N == 600 and str(pipe.name_or_path) == str(export)
    backups = [p for p in dest.parent.iterdir() if p.name.startswith(".weights.backup-")]
    assert len(backups) == 1 and (backups[0] / "old-marker").read_text() == "the weights before"
    assert f"installed {export} into {dest}" in stdout and f"kept in {backups[0]}" in stdout
    assert not (dest / "old-marker").exists() and not (dest / "DONE").exists()
    shipped = json.loads((dest / "made.json").read_text())["shipped"]
    assert shipped["quality_check"]["passed"] and shipped["from"] == str(export.resolve())
    assert min(shipped["detector_accuracy"].values()) >= 0.97
    assert sorted(p.name for p in dest.parent.iterdir() if not p.name.startswith(".weights.backup-")) == ["weights"]
