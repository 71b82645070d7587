import json

import pytest


@pytest.mark.heavy
def test_demo_end_to_end_and_resume(run_cli, tiny_dir, tmp_path):
    out = tmp_path / "demo"
    args = ("demo", "--model", tiny_dir, "--out", out, "--limit", 2, "--steps", 2, "--methods", "uce,trce-T")
    code, stdout, err = run_cli(*args)
    assert code == 0, err
    report = out / "report.html"
    assert report.exists() and "data:image/png;base64" in report.read_text()
    assert "| " in stdout and "report:" in stdout
    for name in ("original", "uce", "trce-T"):
        metrics = json.loads((out / "eval" / name / "metrics.json").read_text())
        assert set(metrics["groups"]) >= {"keyword", "synonym", "paraphrase", "preserve"}
    stamp = (out / "patches" / "uce" / "weights.safetensors").stat().st_mtime_ns
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert (out / "patches" / "uce" / "weights.safetensors").stat().st_mtime_ns == stamp


def test_demo_rejects_unknown_method(run_cli, tmp_path):
    code, _, err = run_cli("demo", "--out", tmp_path / "d", "--methods", "uce,esd-x")
    assert code == 2 and "esd-x" in err


def test_demo_remakes_a_patch_whose_settings_changed(run_cli, tiny_dir, tmp_path):
    out = tmp_path / "demo"
    args = ("demo", "--model", tiny_dir, "--out", out, "--limit", 1, "--steps", 1, "--methods", "uce")
    assert run_cli(*args)[0] == 0
    meta = out / "patches" / "uce" / "patch.json"
    record = json.loads(meta.read_text())
    record["config"]["demo_key"] = "made-with-other-settings"  # as if made by another trce version
    meta.write_text(json.dumps(record))
    stale = out / "eval" / "uce" / "stale-marker"
    stale.write_text("x")
    code, _, err = run_cli(*args)
    assert code == 0, err
    assert json.loads(meta.read_text())["config"]["demo_key"] != "made-with-other-settings"
    assert not stale.exists()  # the old patch's evaluation went with it
