"""`trce eval` and `trce suites` end to end on the tiny model."""

import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts"


def test_suites_lists_builtins(run_cli):
    code, out, _ = run_cli("suites")
    assert code == 0
    for name in ("i2p-sexual", "i2p", "mma", "p4d", "ring-a-bell", "unlearndiff", "coco-3k", "artists",
                 "shapeworld-red", "shapeworld-star", "shapeworld-striped", "shapeworld-3shapes"):
        assert f"  {name} " in out
    code, out, _ = run_cli("suites", "--json")
    assert {r["name"] for r in json.loads(out)} >= {"mma", "shapeworld-3shapes"}


def test_eval_shapeworld_prints_group_table(run_cli, tiny_dir, tmp_path):
    code, out, err = run_cli("eval", "--model", tiny_dir, "--suite", "shapeworld-red", "--limit", "2", "--steps", "2",
                             "--device", "cpu", "--no-progress", "--out", tmp_path)
    assert code == 0, err
    for group in ("keyword", "synonym", "paraphrase", "preserve", "unrelated", "keyword-open", "preserve-open"):
        assert f"\n{group}" in out
    assert "fd - (no patch)" in out and "CLIP score" in out
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["suite"] == "shapeworld-red" and m["patch"] is None and m["fd"] is None and m["n"] == 18
    assert len(list((tmp_path / "images").glob("*.png"))) == 18
    # rerunning resumes: nothing is regenerated, the result is the same
    code, out2, _ = run_cli("eval", "--model", tiny_dir, "--suite", "shapeworld-red", "--limit", "2", "--steps", "2",
                            "--device", "cpu", "--no-progress", "--out", tmp_path)
    assert code == 0 and out2.splitlines()[:-1] == out.splitlines()[:-1]
    assert (tmp_path / "rows.jsonl").read_text().count("\n") == 18


def test_eval_real_suite_with_nudenet(run_cli, tiny_dir, tmp_path):
    if not DATA.is_dir():
        pytest.skip("shared prompt data not found")
    code, out, err = run_cli("eval", "--model", tiny_dir, "--suite", "i2p-sexual", "--data", DATA, "--limit", "3",
                             "--steps", "2", "--threshold", "0.6", "--device", "cpu", "--no-progress", "--out", tmp_path)
    assert code == 0, err
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["kind"] == "real" and m["n"] == 3 and 0 <= m["asr"] <= 1 and len(m["asr_ci"]) == 2
    assert "sexual" in m["by_category"] and m["by_category"]["sexual"]["n"] == 3
    assert m["detector"]["name"] == "nudenet" and m["detector"]["threshold"] == 0.6
    assert set(m["detector"]["class_counts"]) >= {"FEMALE_BREAST_EXPOSED", "ARMPITS_EXPOSED"}
    assert m["settings"]["per_prompt_guidance"] is True
    assert m["clip_score"] is None and "no CLIP weights" in m["clip_score_note"]
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert rows[0]["seed"] == 1867756129 and rows[0]["guidance"] == 7.0 and "exposed" in rows[0]["scores"]
    assert "sexual" in out


def test_eval_prompt_file_and_seeds(run_cli, tiny_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red star on a black background\na blue circle\n")
    code, out, err = run_cli("eval", "--model", tiny_dir, "--prompts", prompts, "--detector", "shapeworld",
                             "--concept", "color=red", "--steps", "2", "--seeds", "0,5", "--device", "cpu",
                             "--no-progress", "--out", tmp_path / "o")
    assert code == 0, err
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["suite"] == "prompts:p.txt" and m["n"] == 4 and len(m["per_seed"]) == 2
    assert m["settings"]["seeds"] == [0, 5] and "mean over seeds" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--suite", "shapeworld-rd"], "unknown suite 'shapeworld-rd' (did you mean 'shapeworld-red'?)"),
    (["--suite", "p4d", "--data", "/nonexistent/x.csv"], "--data /nonexistent/x.csv does not exist"),
    (["--suite", "shapeworld-red", "--threshold", "0.5"], "no --threshold"),
    (["--suite", "shapeworld-red", "--detector", "nudnet"], "unknown detector 'nudnet'"),
    (["--suite", "shapeworld-red", "--seeds", "0,x"], "--seeds must be comma-separated"),
    (["--suite", "i2p", "--data", DATA], "--q16-weights DIR"),
    ([], "give --suite NAME"),
])
def test_eval_user_errors(run_cli, tiny_dir, tmp_path, args, message):
    if DATA in args and not DATA.is_dir():
        pytest.skip("shared prompt data not found")
    if "--seeds" in args:  # argparse reports type errors itself (exit 2 with usage)
        with pytest.raises(SystemExit):
            run_cli("eval", "--model", tiny_dir, *args, "--out", tmp_path)
        return
    code, _, err = run_cli("eval", "--model", tiny_dir, *args, "--device", "cpu", "--out", tmp_path)
    assert code == 2 and message in err and err.startswith("trce: error:")


@pytest.mark.parametrize("flag", ["--out", "--reference-cache"])
def test_eval_folder_flags_that_name_a_file(run_cli, tiny_dir, tmp_path, flag):
    from trce.testing import assert_one_line_error

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    paths = {"--out": tmp_path / "run", "--reference-cache": tmp_path / "cache", flag: a_file}
    code, _, err = run_cli("eval", "--model", tiny_dir, "--suite", "shapeworld-red", "--limit", "1", "--steps", "2",
                           "--device", "cpu", "--no-progress", "--out", paths["--out"], "--reference-cache",
                           paths["--reference-cache"])
    assert_one_line_error(code, err, f"{flag} {a_file} is a file, not a folder")
    assert a_file.read_text() == "x"
