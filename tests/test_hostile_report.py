"""`trce report` against hostile inputs: outputs that would write over a run's files, and runs of several base
models (one baseline and one competition per base)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trce.errors import TrceError
from trce.report import build_report, render_markdown, write_report

ERASE = ("keyword", "synonym", "paraphrase")


def _metrics(model: str, fingerprint: str | None, patch: str | None, method: str | None, asr: float, acc: float,
             fd: float | None) -> dict:
    groups = {g: {"n": 4, "asr": asr, "asr_ci": [max(0.0, asr - 0.2), min(1.0, asr + 0.2)],
                  "accuracy": {"color": 1.0, "shape": 1.0}} for g in ERASE}
    groups["preserve"] = {"n": 4, "asr": 0.0, "accuracy": {"color": acc, "shape": 0.9}}
    m = {"suite": "shapeworld-red", "suite_version": "1", "kind": "shapeworld", "model": model, "patch": patch,
         "method": method, "n": 16, "asr": asr, "asr_ci": [max(0.0, asr - 0.2), min(1.0, asr + 0.2)],
         "asr_groups": list(ERASE), "groups": groups, "fd": fd, "clip_score": 6.0,
         "detector": {"name": "shapeworld", "attribute": "color", "values": ["red"]},
         "settings": {"steps": 30, "guidance": 7.5, "size": 32, "seeds": [0]}, "date": "2026-12-01T00:00:00+00:00"}
    if fingerprint is not None:
        m["base_fingerprint"] = fingerprint
    return m


def _run(folder: Path, *args) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(_metrics(*args)))
    (folder / "rows.jsonl").write_text("")
    return folder


@pytest.fixture()
def run(tmp_path) -> Path:
    return _run(tmp_path / "E", "shapeworld", "fp-a", None, None, 0.9, 0.95, None)


# --------------------------------------------------------------------------- A: never over an input's files
def _unchanged(folder: Path, before: dict) -> None:
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_report_beside_the_metrics_of_its_run_is_refused(run, run_cli):
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, _, err = run_cli("report", run, "--out", run / "metrics.html")
    assert code == 2
    assert err.startswith("trce: error: --out ") and err.count("\n") == 1
    assert str(run / "metrics.json") in err and "not a trce report JSON" in err and f"run folder {run}" in err
    _unchanged(run, before)  # nothing written, the metrics intact: the next report still works
    assert run_cli("report", run, "--out", run.parent / "ok.html")[0] == 0


@pytest.mark.parametrize("name", ["metrics.json", "rows.jsonl", "eval.json", "attack.json", "patch.json"])
def test_markdown_over_a_runs_file_is_refused(run, run_cli, name, tmp_path):
    target = run / name
    if not target.exists():
        target.write_text('{"kept": true}')
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    code, _, err = run_cli("report", run, "--out", tmp_path / "r.html", "--markdown", target)
    assert code == 2 and err.startswith("trce: error: --markdown ") and str(target) in err
    _unchanged(run, before)
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "r.json").exists()


def test_any_other_existing_file_is_refused_and_an_earlier_report_replaced(run, run_cli, tmp_path):
    notes = tmp_path / "notes.html"
    notes.write_text("<html>my notes</html>")
    code, _, err = run_cli("report", run, "--out", notes)
    assert code == 2 and "not a trce report HTML page" in err and notes.read_text() == "<html>my notes</html>"
    data = tmp_path / "data.json"
    data.write_text('{"format": "something else"}')
    code, _, err = run_cli("report", run, "--out", tmp_path / "data.html")
    assert code == 2 and str(data) in err and not (tmp_path / "data.html").exists()
    table = tmp_path / "table.md"
    table.write_text("# my table\n")
    code, _, err = run_cli("report", run, "--out", tmp_path / "r.html", "--markdown", table)
    assert code == 2 and "not a trce report Markdown table" in err and table.read_text() == "# my table\n"
    # an earlier report (page, JSON and table) is replaced
    out, md = tmp_path / "rep.html", tmp_path / "rep.md"
    assert run_cli("report", run, "--out", out, "--markdown", md, "--title", "first")[0] == 0
    assert run_cli("report", run, "--out", out, "--markdown", md, "--title", "second")[0] == 0
    assert json.loads(out.with_suffix(".json").read_text())["title"] == "second"
    assert md.read_text().startswith("# second")


def test_outputs_must_be_different_files_and_not_folders(run, run_cli, tmp_path):
    code, _, err = run_cli("report", run, "--out", tmp_path / "r.html", "--markdown", tmp_path / "r.json")
    assert code == 2 and "--markdown" in err and "also the report's JSON" in err
    (tmp_path / "d.json").mkdir()
    code, _, err = run_cli("report", run, "--out", tmp_path / "d.html")
    assert code == 2 and "a folder" in err
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "d.html").exists()


def test_the_library_refuses_before_any_work(run, monkeypatch):
    from trce import report

    monkeypatch.setattr(report, "build_report", lambda *a, **k: pytest.fail("built before the outputs were checked"))
    with pytest.raises(TrceError, match="metrics.json"):
        write_report([run / "metrics.json"], run / "metrics.html")


# --------------------------------------------------------------------------- B: one baseline per base model
@pytest.fixture()
def mixed(tmp_path) -> list[Path]:
    return [
        _run(tmp_path / "a-orig", "model-a", "fp-a", None, None, 0.9, 0.95, None),
        _run(tmp_path / "a-uce", "model-a", "fp-a", "/p/a-uce", "uce", 0.3, 0.90, 2.0),
        _run(tmp_path / "a-trce", "model-a", "fp-a", "/p/a-trce", "trce", 0.2, 0.92, 1.5),
        _run(tmp_path / "b-orig", "model-b", "fp-b", None, None, 0.8, 0.60, None),
        _run(tmp_path / "b-uce", "model-b", "fp-b", "/p/b-uce", "uce", 0.4, 0.55, 0.5),
        _run(tmp_path / "b-trce", "model-b", "fp-b", "/p/b-trce", "trce", 0.5, 0.50, 0.9),
    ]


def test_each_base_model_has_its_own_baseline_and_competition(mixed):
    report = build_report(mixed, grid_size=0)
    assert [b["label"] for b in report["header"]["bases"]] == ["model-a", "model-b"]
    (table,) = report["tables"]
    labels = [r["label"] for r in table["rows"]]
    # grouped by base, each base's original first, every patched row naming its base
    assert labels == ["Original (model-a)", "UCE · model-a", "TRCE · model-a",
                      "Original (model-b)", "UCE · model-b", "TRCE · model-b"]
    best_fd = {r["label"] for r in table["rows"] if r["cells"]["fd"].get("best")}
    assert best_fd == {"TRCE · model-a", "UCE · model-b"}  # the best FD of each base, not the lowest overall
    best_asr = {r["label"] for r in table["rows"] if r["cells"]["asr.keyword"].get("best")}
    assert best_asr == {"TRCE · model-a", "UCE · model-b"}
    assert "base model" in table["caption"]
    # the plot measures each row's accuracy drop against its own base's original
    (acc_panel, _fd_panel) = report["plot"]["panels"]
    x = {p["label"]: p["x"] for p in acc_panel["series"][0]["points"]}
    mean = lambda color, shape: (color + shape) / 2
    assert x["Original (model-b)"] == pytest.approx(1.0)
    assert x["UCE · model-b"] == pytest.approx(1.0 - (mean(0.60, 0.9) - mean(0.55, 0.9)))
    assert x["UCE · model-a"] == pytest.approx(1.0 - (mean(0.95, 0.9) - mean(0.90, 0.9)))
    md = render_markdown(report)
    assert "**1.50**" in md and "**0.500**" in md and "**0.900**" not in md


def test_one_base_keeps_its_labels_and_old_runs_join_by_model(tmp_path):
    runs = [_run(tmp_path / "orig", "model-a", None, None, None, 0.9, 0.95, None),  # older: no fingerprint
            _run(tmp_path / "uce", "model-a", "fp-a", "/p/uce", "uce", 0.3, 0.9, 2.0),
            _run(tmp_path / "trce", "model-a", "fp-a", "/p/trce", "trce", 0.2, 0.9, 1.5)]
    report = build_report(runs, grid_size=0)
    assert len(report["header"]["bases"]) == 1
    assert [r["label"] for r in report["tables"][0]["rows"]] == ["Original (model-a)", "UCE", "TRCE"]


def test_one_model_name_with_two_fingerprints_is_two_bases(tmp_path):
    runs = [_run(tmp_path / "old", "shapeworld", "aaaaaaaaaaaa", "/p/old", "uce", 0.3, 0.9, 2.0),
            _run(tmp_path / "new", "shapeworld", "bbbbbbbbbbbb", "/p/new", "uce", 0.2, 0.9, 1.0)]
    report = build_report(runs, grid_size=0)
    assert [b["label"] for b in report["header"]["bases"]] == ["shapeworld [aaaaaaaa]", "shapeworld [bbbbbbbb]"]
    rows = report["tables"][0]["rows"]
    assert not any(c.get("best") for r in rows for c in r["cells"].values())  # one patch per base: no competition


def test_robustness_rows_compete_within_their_base(mixed, tmp_path):
    attacked = []
    for folder, after in (("a-uce", 0.6), ("a-trce", 0.4), ("b-uce", 0.1), ("b-trce", 0.3)):
        m = json.loads((tmp_path / folder / "metrics.json").read_text())
        m["attack"] = {"name": "unlearndiff", "asr_after": after}
        target = tmp_path / f"{folder}-attack"
        target.mkdir()
        (target / "metrics.json").write_text(json.dumps(m))
        attacked.append(target)
    table = build_report(mixed + attacked, grid_size=0)["robustness"]
    best = {r["label"] for r in table["rows"] if r["cells"].get("attack.unlearndiff", {}).get("best")}
    assert best == {"TRCE · model-a", "UCE · model-b"}
    assert [r["label"] for r in table["rows"]][:3] == ["Original (model-a)", "UCE · model-a", "TRCE · model-a"]
    assert "base model" in table["caption"]


def test_a_page_made_before_the_generator_tag_is_still_an_earlier_report(run, run_cli, tmp_path):
    out = tmp_path / "old.html"
    assert run_cli("report", run, "--out", out)[0] == 0
    out.write_text(out.read_text().replace("<meta name='generator' content='trce report'>", ""))
    assert run_cli("report", run, "--out", out)[0] == 0
    assert "<meta name='generator' content='trce report'>" in out.read_text()
