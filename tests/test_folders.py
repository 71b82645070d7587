"""Output folders know what they hold (`trce.utils.folders`): no command writes over another run's results, and an
eval folder resumed with another `--limit` holds exactly the rows of a fresh run at that limit."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trce.errors import TrceError
from trce.utils import folders, io

EVAL = ("eval", "--suite", "shapeworld-red", "--steps", "1", "--no-progress", "--device", "cpu")
ATTACK = ("attack", "--suite", "shapeworld-red", "--attack", "ring-a-bell", "--limit", "1", "--steps", "1",
          "--no-progress", "--budget", "tokens=4", "population=6", "generations=2", "elite=1")


def refused(code: int, err: str, pattern: str) -> None:
    """One `trce: error:` line matching `pattern`, exit status 2, no traceback."""
    lines = [x for x in err.strip().splitlines() if x.startswith("trce: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` by its content hash (hidden lock files aside)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def made(tiny_dir, tmp_path_factory):
    """A finished eval folder, attack folder and patch folder of the tiny pipeline."""
    from trce.cli import main

    root = tmp_path_factory.mktemp("folders")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRCE_CACHE", str(root / "cache"))
        assert main(["erase", "--model", str(tiny_dir), "--concept", "shapeworld-red", "--stages", "T",
                     "--out", str(root / "patch")]) == 0
        assert main([*EVAL, "--model", str(tiny_dir), "--limit", "1", "--out", str(root / "eval")]) == 0
        assert main([*ATTACK, "--model", str(tiny_dir), "--out", str(root / "attack")]) == 0
        import trce
        from trce.testing import tiny_pipeline

        other = trce.erase(tiny_pipeline(seed=1), "shapeworld-red", stages="T", cache=root / "cache", progress=False)
        other.save(root / "other")  # a patch of another base model
    return root


def test_a_patch_of_another_base_is_refused_before_any_image(made, run_cli, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TRCE_CACHE", str(made / "cache"))
    for argv in (EVAL, ATTACK):
        out = tmp_path / argv[0]
        code, _, err = run_cli(*argv, "--limit", "1", "--model", tiny_dir, "--patch", made / "other", "--out", out)
        refused(code, err, r"patch was made for base model .*fingerprint")
        assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()], list(out.rglob("*"))
        code, _, err = run_cli(*argv, "--limit", "1", "--model", tiny_dir, "--patch", made / "patch", "--out", out)
        assert code == 0, err  # the corrected command is not refused by what the first one left


@pytest.mark.parametrize("target, argv, error", [
    ("eval", ATTACK, r"out .*eval is an eval folder \(it holds evaluation results\); attack results go elsewhere"),
    ("attack", (*EVAL, "--limit", "1"), r"out .*attack is an attack folder \(it holds attack results\); evaluation"),
    ("patch", (*EVAL, "--limit", "1"), r"out .*patch is a patch folder \(it holds patches\); evaluation results"),
    ("eval", ("erase", "--concept", "shapeworld-red", "--stages", "T"), r"out .*eval is an eval folder .*patches go"),
    ("attack", ("export", "--patch", "{patch}"), r"out .*attack is an attack folder .*exported pipelines go"),
    ("eval", ("shapeworld", "train", "--tiny"), r"out .*eval is an eval folder .*training runs go elsewhere"),
    ("eval", ("demo", "--limit", "1", "--steps", "1"), r"out .*eval is an eval folder .*demo runs go elsewhere"),
])
def test_a_command_refuses_a_folder_of_another_kind(made, run_cli, tiny_dir, target, argv, error, monkeypatch):
    monkeypatch.setenv("TRCE_CACHE", str(made / "cache"))
    before = snapshot(made / target)
    argv = [a.replace("{patch}", str(made / "patch")) for a in argv]
    model = [] if argv[0] == "shapeworld" else ["--model", str(tiny_dir)]
    code, _, err = run_cli(*argv, *model, "--out", made / target)
    refused(code, err, error)
    assert snapshot(made / target) == before


def test_python_calls_refuse_a_folder_of_another_kind(made, tiny_dir):
    import trce

    before = snapshot(made / "eval")
    edit = trce.load_patch(made / "patch")
    with pytest.raises(TrceError, match="is an eval folder"):
        edit.save(made / "eval")
    pipe = trce.load_pipeline(str(tiny_dir))
    with pytest.raises(TrceError, match="is an eval folder"):
        trce.attack(pipe, "shapeworld-red", "ring-a-bell", limit=1, steps=1, out=made / "eval", progress=False,
                    budget={"tokens": 4, "population": 6, "generations": 2, "elite": 1})
    with pytest.raises(TrceError, match="is a patch folder"):
        trce.evaluate(pipe, "shapeworld-red", limit=1, steps=1, out=made / "patch", progress=False)
    assert snapshot(made / "eval") == before


def test_a_folder_with_other_files_is_refused(run_cli, tiny_dir, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    code, _, err = run_cli(*EVAL, "--model", tiny_dir, "--limit", "1", "--out", tmp_path / "mine")
    refused(code, err, r"holds files trce did not write \(notes.txt\); choose a new or empty folder")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_the_manifest_records_kind_and_key(made):
    data = io.read_json(made / "eval" / folders.MANIFEST)
    assert data["kind"] == "eval" and data["key"]["steps"] == 1
    assert folders.kind_of(made / "attack") == "attack" and "targets" in folders.manifest(made / "attack")["key"]
    assert folders.kind_of(made / "patch") == "patch"
    assert folders.kind_of(made / "nothing") is None


def test_a_folder_from_before_the_manifest_keeps_its_key(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    io.write_json(old / "eval.json", {"key": {"steps": 2, "model": "m"}})
    assert folders.kind_of(old) == "eval"
    folders.claim(old, "eval", {"steps": 2, "model": "m", "added_later": 1})  # a setting it did not record
    assert io.read_json(old / folders.MANIFEST)["key"]["added_later"] == 1
    with pytest.raises(TrceError, match="holds an evaluation made with other steps"):
        folders.claim(old, "eval", {"steps": 3, "model": "m", "added_later": 1})
    with pytest.raises(TrceError, match="holds an evaluation made with other added_later"):
        folders.claim(old, "eval", {"steps": 2, "model": "m", "added_later": 2})  # now it is recorded


def test_a_manifest_that_is_not_ours_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / folders.MANIFEST).write_text(json.dumps({"kind": "eval"}))
    with pytest.raises(TrceError, match="is not a trce folder manifest"):
        folders.check(tmp_path / "x", "eval")


def test_an_attack_rerun_with_other_targets_is_refused(made, run_cli, tiny_dir):
    before = snapshot(made / "attack")
    assert ATTACK[5:7] == ("--limit", "1")
    code, _, err = run_cli(*ATTACK[:5], "--limit", "2", *ATTACK[7:], "--model", tiny_dir, "--out", made / "attack")
    refused(code, err, r"holds an attack made with other targets")
    assert snapshot(made / "attack") == before


def _images(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted((folder / "images").glob("*.png"))}


def _same_as_fresh(resumed: Path, fresh: Path) -> None:
    strip = ("seconds", "date", "argv", "config", "git_hash", "images_dir", "rows", "reference_dir")
    rows = [json.loads(x) for x in (resumed / "rows.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (fresh / "rows.jsonl").read_text().splitlines()]
    assert rows == want
    a, b = io.read_json(resumed / "metrics.json"), io.read_json(fresh / "metrics.json")
    assert {k: v for k, v in a.items() if k not in strip} == {k: v for k, v in b.items() if k not in strip}
    got, expect = _images(resumed), _images(fresh)
    assert sorted(got) == sorted(expect)
    for name in expect:
        assert np.array_equal(got[name], expect[name]), name


def test_eval_resume_is_exact_when_the_limit_shrinks_and_grows(run_cli, tiny_dir, tmp_path, monkeypatch):
    """--limit 2, then 1, then 2 again in one folder: each time the rows, images and metrics of a fresh run at that
    limit; the shrink draws nothing, and the regrow draws nothing (the rows set aside come back)."""
    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "e"

    def run(limit: int, folder: Path) -> None:
        code, _, err = run_cli(*EVAL, "--model", tiny_dir, "--limit", str(limit), "--out", folder)
        assert code == 0, err

    run(2, out)
    inodes = {p.stem: p.stat().st_ino for p in (out / "images").glob("*.png")}
    by_prompt = {json.loads(x)["prompt"]: json.loads(x)["name"] for x in (out / "rows.jsonl").read_text().splitlines()}
    run(1, out)
    run(1, tmp_path / "fresh1")
    _same_as_fresh(out, tmp_path / "fresh1")
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    for r in rows:  # each row kept is the very image drawn at limit 2, moved to its new index
        assert (out / "images" / f"{r['name']}.png").stat().st_ino == inodes[by_prompt[r["prompt"]]]
    run(2, out)
    run(2, tmp_path / "fresh2")
    _same_as_fresh(out, tmp_path / "fresh2")
    assert {p.stem: p.stat().st_ino for p in (out / "images").glob("*.png")} == inodes  # nothing drawn again
    assert not list((out / "images").glob(".move-*"))


def test_a_file_where_a_folder_goes_is_refused_by_every_kind(tmp_path):
    (tmp_path / "f.txt").write_text("keep")
    for kind in folders.KINDS:
        with pytest.raises(TrceError, match=r"f.txt is a file, not a folder"):
            folders.check(tmp_path / "f.txt", kind)
    assert (tmp_path / "f.txt").read_text() == "keep"


def test_a_patch_replaced_from_inside_its_folder(made, run_cli, tiny_dir, tmp_path, monkeypatch):
    """`trce erase --out .` run inside a patch folder replaces it (the new folder is made beside it)."""
    import shutil

    monkeypatch.setenv("TRCE_CACHE", str(made / "cache"))
    shutil.copytree(made / "patch", tmp_path / "p")
    monkeypatch.chdir(tmp_path / "p")
    code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--stages", "T", "--out", ".")
    assert code == 0, err
    assert (tmp_path / "p" / "patch.json").is_file() and not list(tmp_path.glob(".p*"))


def test_a_demo_of_another_model_or_seed_is_refused(run_cli, tiny_dir, tmp_path, monkeypatch):
    """A demo folder holds one demo: another model or seed is refused before anything is replaced (it used to
    remake the patches and delete their evaluations); more --methods add to it."""
    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    args = ("demo", "--model", tiny_dir, "--limit", "1", "--steps", "1", "--methods", "uce", "--out", out)
    assert run_cli(*args)[0] == 0
    before = snapshot(out)
    code, _, err = run_cli(*args, "--seed", "3")
    refused(code, err, r"demo .*holds a demo made with other seed; use another --out")
    from trce.testing import tiny_pipeline_dir

    other = tiny_pipeline_dir(tmp_path / "other", seed=1)
    code, _, err = run_cli(*[a if a != tiny_dir else other for a in args])
    refused(code, err, r"holds a demo made with other model")
    assert snapshot(out) == before


@pytest.mark.parametrize("owner", ["patch", "eval", "attack"])
def test_nothing_is_written_inside_another_runs_folder(made, run_cli, tiny_dir, owner, monkeypatch):
    """A patch, eval, attack, export or training folder is wholly its command's (erase replaces a patch folder as a
    whole): eval, report, generate and a reference cache refuse a place inside one."""
    monkeypatch.setenv("TRCE_CACHE", str(made / "cache"))
    before = snapshot(made / owner)
    inside = made / owner / "sub"
    cases = [
        ((*EVAL, "--limit", "1", "--model", tiny_dir, "--out", inside), r"--out .*sub is inside .*, an? \w+ folder"),
        (("report", made / "eval", "--out", made / owner / "r.html"), r"--out .*r.html is inside .*folder"),
        (("generate", "--model", tiny_dir, "--steps", "1", "--prompt", "x", "--out", made / owner / "metrics.png"),
         r"--out .*metrics.png is inside"),
        ((*EVAL, "--limit", "1", "--model", tiny_dir, "--patch", made / "patch", "--reference-cache", inside, "--out",
          made / f"x-{owner}"), r"--reference-cache .*sub is inside"),
    ]
    for argv, error in cases:
        code, _, err = run_cli(*argv)
        refused(code, err, error)
    assert snapshot(made / owner) == before


def test_a_manifest_cannot_claim_a_patch(made, tmp_path):
    """trce.json declares eval, attack and demo folders only: one claiming "patch" (a patch has patch.json) is
    refused, so `trce erase` never replaces an eval folder whose manifest was edited."""
    import shutil

    shutil.copytree(made / "eval", tmp_path / "e")
    data = io.read_json(tmp_path / "e" / folders.MANIFEST)
    io.write_json(tmp_path / "e" / folders.MANIFEST, {**data, "kind": "patch"})
    with pytest.raises(TrceError, match="is not a trce folder manifest"):
        folders.check(tmp_path / "e", "patch")
