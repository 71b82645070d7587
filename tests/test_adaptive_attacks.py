"""Adaptive attacks: random restarts (`--budget restarts=N`) and held-out targets for hardened patches.

Restarts: restart 0 is the search of a run without restarts, restarts=1 changes nothing (seeds, result lines,
digests, files), a target counts as broken when any restart succeeds and keeps the best restart (success first,
then the objective), and a killed run resumes target by target. Held out: an attack on a patch hardened on its
spec's prompts drops the targets among them, says so, and searches with a seed stream of its own.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trce.attacks import base, mma_text
from trce.attacks.held_out import hardening, hold_out, normalise
from trce.edit import Edit
from trce.testing import assert_one_line_error
from trce.utils import io

MMA = ["tokens=3", "steps=2", "topk=4", "candidates=4"]
SOFT = ["tokens=2", "steps=2", "samples=1", "reference_steps=1"]


def _attack(run_cli, tiny_dir, out, name, budget, *extra, limit=2):
    return run_cli("attack", "--model", tiny_dir, "--suite", "shapeworld-red", "--attack", name, "--out", out,
                   "--limit", limit, "--steps", "1", "--no-progress", "--budget", *budget, *extra)


def _csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _keyword_prompts(n: int) -> list[str]:
    from trce.eval.suites import load_suite

    return [r.prompt for r in load_suite("shapeworld-red").rows(None, n) if r.category == "keyword"]


# --------------------------------------------------------------------------- restarts: seeds and selection
def test_restart_zero_is_the_search_without_restarts_and_streams_are_apart():
    config = base.AttackConfig(budget=mma_text.Budget(), seed=7)
    target = base.Target(index=3, prompt="a red circle", seed=11)
    legacy = int(np.random.SeedSequence([7, 11, 3]).generate_state(1, dtype=np.uint32)[0])
    assert base.target_seed(config, target) == legacy
    seeds = {base.target_seed(config, dataclasses.replace(target, restart=r)) for r in range(4)}
    held = dataclasses.replace(config, stream=base.HELD_OUT_STREAM)
    seeds |= {base.target_seed(held, dataclasses.replace(target, restart=r)) for r in range(4)}
    assert len(seeds) == 8  # four restarts, each in both streams: all apart
    # the digest of restarts=1 (and no preset) is the one written before restarts existed: old lines are reused
    key = {"attack": "mma-text", "budget": {k: v for k, v in dataclasses.asdict(mma_text.Budget()).items()
                                            if k not in ("restarts", "preset")},
           "seed": 7, "banned": [], "pairs": [], "size": None}
    assert config.digest("mma-text") == hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    assert config.digest("mma-text") != dataclasses.replace(config, budget=mma_text.Budget(restarts=2)).digest("x")
    assert held.digest("mma-text") != config.digest("mma-text")


def test_the_kept_restart_is_a_success_first_then_the_lowest_objective():
    assert base.choose_restart([0.5, 0.2, 0.1], [False, True, True]) == 2
    assert base.choose_restart([0.5, 0.2, 0.1], [True, False, False]) == 0
    assert base.choose_restart([0.5, 0.2, 0.2], [None, False, None]) == 1  # undecided is no success; ties: first
    with pytest.raises(base.TrceError, match="restarts must be a positive integer"):
        mma_text.Budget(restarts=0)
    with pytest.raises(base.TrceError, match="restarts must be int, got '1.5'"):
        base.parse_budget(mma_text.Budget, ["restarts=1.5"], "mma-text")


def test_restarts_in_the_library_keep_restart_zero_and_the_lowest_objective(tiny_pipe):
    targets = ["a red circle on a black background", "a crimson square"]
    one = mma_text.attack(tiny_pipe, targets, base.AttackConfig(budget=base.parse_budget(mma_text.Budget, MMA,
                                                                                         "mma-text")),
                          progress=False)
    budget = base.parse_budget(mma_text.Budget, [*MMA, "restarts=3"], "mma-text")
    three = mma_text.attack(tiny_pipe, targets, base.AttackConfig(budget=budget), progress=False)
    for a, b in zip(one, three):
        assert "restarts" not in a.extra and "restart" not in a.to_json()["extra"]
        first = b.extra["restarts"][0]
        assert (first["prompt"], first["tokens"], first["objective"], first["attack_seed"]) == (
            a.prompt, a.tokens, a.objective, a.attack_seed)
        assert len({r["attack_seed"] for r in b.extra["restarts"]}) == 3
        assert b.objective == min(r["objective"] for r in b.extra["restarts"])
        assert b.extra["restarts"][b.extra["restart"]]["prompt"] == b.prompt
        assert [p.prompt for p in base.restart_results(b)] == [r["prompt"] for r in b.extra["restarts"]]
        again = base.restart_results(base.TargetResult.from_json(b.to_json()))  # as read back from a results file
        assert [p.tokens for p in again] == [r["tokens"] for r in b.extra["restarts"]]


# --------------------------------------------------------------------------- restarts: the run
class _FlagRestart:
    """The suite's detector, but restart 1 of target 0 succeeds whatever the image (the others as judged)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def detect(self, images, rows):
        out = self.inner.detect(images, rows)
        for res, row in zip(out, rows):
            if row.extra.get("restart") is not None:
                res["verdict"] = row.extra["restart"] == 1 and row.case_number == 0
        return out


def test_any_restart_breaks_a_target_and_the_best_is_written(run_cli, tiny_dir, tmp_path, monkeypatch):
    from trce.eval import detectors

    real = detectors.make_detector
    monkeypatch.setattr(detectors, "make_detector", lambda *a, **k: _FlagRestart(real(*a, **k)))
    out = tmp_path / "mma"
    code, text, err = _attack(run_cli, tiny_dir, out, "mma-text", [*MMA, "restarts=2"])
    assert code == 0, err
    assert "restarts: 2 per target, broken by any 1 of 2" in text
    m = io.read_json(out / "metrics.json")
    a = m["attack"]
    assert a["budget"]["restarts"] == 2 and a["restarts"]["n"] == 2 and a["restarts"]["broken_any"] == 1
    assert a["restarts"]["chosen"][0] == 1 and a["restarts"]["asr_by_restart"] == [0.0, 0.5]
    assert a["asr_after"] == 0.5 and "success first" in a["restarts"]["selection"]
    results = _results(out)
    rows = _csv(out / "adversarial.csv")
    assert rows[0]["restart"] == "1" and rows[0]["prompt"] == results[0]["extra"]["restarts"][1]["prompt"]
    # target 1: no restart succeeded, so the lower objective is kept
    objectives = [r["objective"] for r in results[1]["extra"]["restarts"]]
    assert rows[1]["restart"] == str(int(np.argmin(objectives)))
    after = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    assert [r["verdict"] for r in after] == [True, False] and after[0]["prompt"] == rows[0]["prompt"]
    assert (out / "images" / "00000.png").read_bytes() == (out / "restarts" / "images" / "00000-r1.png").read_bytes()
    assert len(list((out / "restarts" / "images").glob("*.png"))) == 4
    # a rerun finds every restart done: nothing searched or drawn again
    before = {p: p.stat().st_mtime_ns for p in [out / "results.jsonl", *sorted((out / "restarts").glob("**/*.png"))]}
    assert _attack(run_cli, tiny_dir, out, "mma-text", [*MMA, "restarts=2"])[0] == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert io.read_json(out / "metrics.json")["attack"]["asr_after"] == 0.5


def test_soft_prompt_restarts_keep_each_restarts_embeddings(run_cli, tiny_dir, tmp_path):
    out = tmp_path / "soft"
    code, _, err = _attack(run_cli, tiny_dir, out, "soft-prompt", [*SOFT, "restarts=2"], limit=1)
    assert code == 0, err
    (row,) = _csv(out / "adversarial.csv")
    (res,) = _results(out)
    files = [r["embeddings"] for r in res["extra"]["restarts"]]
    assert files == ["embeddings/00000.safetensors", "embeddings/00000-r1.safetensors"]
    assert all((out / f).exists() for f in files) and row["embeddings"] == files[int(row["restart"])]


def test_restarts_one_leaves_the_run_as_it_was(run_cli, tiny_dir, tmp_path):
    code, _, err = _attack(run_cli, tiny_dir, tmp_path / "plain", "mma-text", MMA)
    assert code == 0, err
    code, _, err = _attack(run_cli, tiny_dir, tmp_path / "one", "mma-text", [*MMA, "restarts=1"])
    assert code == 0, err
    for name in ("adversarial.csv", "rows.jsonl", "before/rows.jsonl", "trce.json"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in _results(tmp_path / "plain")]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in _results(tmp_path / "one")]
    assert "restarts" not in json.dumps(strip) and not (tmp_path / "one" / "restarts").exists()
    assert "restart" not in _csv(tmp_path / "one" / "adversarial.csv")[0]
    legacy = int(np.random.SeedSequence([0, 0, 0]).generate_state(1, dtype=np.uint32)[0])
    assert strip[0]["attack_seed"] == legacy  # SeedSequence([run seed, target seed, index]), as before restarts
    a = io.read_json(tmp_path / "one" / "metrics.json")["attack"]
    assert a["restarts"] == {"n": 1} and a["seed_stream"] == 0


@pytest.mark.heavy
def test_a_killed_run_with_restarts_resumes_per_target(run_cli, tiny_dir, tmp_path):
    args = ["attack", "--model", tiny_dir, "--suite", "shapeworld-red", "--attack", "mma-text", "--limit", 2,
            "--steps", 1, "--no-progress", "--budget", *MMA, "restarts=2"]
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRCE_THREADS": "1", "TRCE_TEST_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    interrupt = Path(__file__).with_name("interrupt.py")  # killed right after target 0's line is written
    proc = subprocess.run([sys.executable, str(interrupt), "KILL", "records:results", "1", "-q",
                           *map(str, [*args, "--out", out])], check=False, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    first = (out / "results.jsonl").read_text().splitlines()
    assert len(first) == 1 and len(json.loads(first[0])["extra"]["restarts"]) == 2
    code, _, err = run_cli(*args, "--out", out)
    assert code == 0, err
    lines = (out / "results.jsonl").read_text().splitlines()
    assert lines[0] == first[0] and [json.loads(x)["index"] for x in lines] == [0, 1]  # target 0 not searched again
    code, _, err = run_cli(*args, "--out", tmp_path / "whole")
    assert code == 0, err
    resumed = [json.loads(x) for x in lines]
    whole = _results(tmp_path / "whole")
    assert [[x["prompt"] for x in r["extra"]["restarts"]] for r in resumed] == [
        [x["prompt"] for x in r["extra"]["restarts"]] for r in whole]
    assert _csv(out / "adversarial.csv") == _csv(tmp_path / "whole" / "adversarial.csv")


# --------------------------------------------------------------------------- held-out targets
def _edit(method="trce", settings=None, spec=None, **kw):
    return Edit(weights={}, method=method, settings=settings or {}, spec=spec or {}, **kw)


def test_which_patches_are_hardened():
    assert hardening(_edit(settings={"stage": "T", "eta": 0.01})) is None
    assert hardening(_edit(settings={"stage": "T", "robust": {"robust": 0}})) is None
    assert hardening(_edit("rece", {"stage": "T", "robust": {"robust": 3, "robust_attack": "closed-form"}}))["by"] == [
        "rece stage T robust=3"]
    multi = {"stages": ["T", "V"], "T": {"stage": "T", "robust": {"robust": 2}}, "V": {"robust": 2}}
    assert hardening(_edit(settings=multi))["by"] == ["trce stage T robust=2", "trce stage V robust=2"]
    adv = hardening(_edit("advunlearn", {"attack_steps": 30, "erase_prompts": ["A  Red circle"]}))
    assert adv["by"] == ["advunlearn adversarial training"] and adv["erase_prompts"] == ["A  Red circle"]
    targets = [base.Target(0, "a red circle", 0), base.Target(1, "a blue square", 1)]
    keep, record = hold_out(_edit("advunlearn", {"attack_steps": 30, "erase_prompts": ["A  Red circle"]}), targets)
    assert keep == [1] and record["dropped"] == 1 and record["dropped_indices"] == [0]
    assert record["seed_stream"] == base.HELD_OUT_STREAM and "hardened" in record["reason"]
    assert normalise(" A\tRED circle ") == "a red circle"
    with pytest.raises(base.TrceError, match="records neither its spec nor its erase prompts"):
        hold_out(_edit(settings={"robust": 1}), targets)


@pytest.fixture(scope="module")
def hardened_patch(tiny_dir, tmp_path_factory):
    """A tiny stage-T patch hardened (one closed-form round) on a spec whose one malicious prompt is the first
    keyword prompt of shapeworld-red."""
    from trce.cli import main

    folder = tmp_path_factory.mktemp("hardened")
    prompt = _keyword_prompts(1)[0]
    (folder / "spec.yaml").write_text(
        "name: held-red\nerase:\n  target: a shape\n  expressions: [" + json.dumps(prompt) + "]\n"
        "templates: ['{}', 'a photo of {}']\n"
        "preserve: {prompts: ['a blue circle on a white background', 'a green square on a black background']}\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRCE_CACHE", str(folder / "cache"))
        assert main(["-q", "erase", "--model", str(tiny_dir), "--concept", str(folder / "spec.yaml"), "--stages", "T",
                     "--robust", "1", "--set", "T.robust_attack=closed-form", "--out", str(folder / "patch")]) == 0
    return folder / "patch"


def test_a_hardened_patch_is_attacked_on_held_out_targets(run_cli, tiny_dir, hardened_patch, tmp_path, caplog):
    out = tmp_path / "held"
    with caplog.at_level(logging.INFO, logger="trce"):
        code, text, err = _attack(run_cli, tiny_dir, out, "mma-text", MMA, "--patch", hardened_patch)
    assert code == 0, err
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("held out")]
    assert said == ["held out 1 of 2 targets: prompts the hardened patch (trce stage T robust=1) saw; attacking 1"]
    m = io.read_json(out / "metrics.json")
    assert m["held_out"]["dropped"] == 1 and m["held_out"]["kept"] == 1 and m["n"] == 1
    assert "spec held-red" in m["held_out"]["reason"] and "held out: 1 targets" in text
    assert m["attack"]["seed_stream"] == base.HELD_OUT_STREAM
    first = _keyword_prompts(2)
    (row,) = _csv(out / "adversarial.csv")
    assert row["target_prompt"] == first[1] and row["case_number"] == "1"
    (res,) = _results(out)
    stream = base.AttackConfig(seed=0, stream=base.HELD_OUT_STREAM)
    target = base.Target(index=1, prompt=first[1], seed=res["seed"])
    assert res["attack_seed"] == base.target_seed(stream, target)
    assert res["attack_seed"] != base.target_seed(base.AttackConfig(seed=0), target)


def test_the_python_api_holds_out_too(tiny_dir, hardened_patch):
    import trce

    pipe = trce.load_pipeline(str(tiny_dir), device="cpu")
    m = trce.attack(pipe, "shapeworld-red", "mma-text", edit=trce.load_patch(hardened_patch), budget=MMA, limit=2,
                    steps=1, progress=False)
    assert m["n"] == 1 and m["held_out"]["dropped"] == 1
    assert [r.target for r in m.results] == _keyword_prompts(2)[1:]


def test_unhardened_patches_keep_every_target(tiny_dir, tmp_path, monkeypatch):
    from trce.cli import main
    from trce.edit import load_patch

    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    assert main(["-q", "erase", "--model", str(tiny_dir), "--concept", "shapeworld-red", "--stages", "T",
                 "--out", str(tmp_path / "plain")]) == 0
    edit = load_patch(tmp_path / "plain")
    assert hardening(edit) is None
    keep, record = hold_out(edit, [base.Target(0, p, 0) for p in _keyword_prompts(2)])
    assert keep == [0, 1] and record is None


def test_every_target_seen_is_one_clear_error(run_cli, tiny_dir, hardened_patch, tmp_path):
    code, _, err = _attack(run_cli, tiny_dir, tmp_path / "none", "mma-text", MMA, "--patch", hardened_patch, limit=1)
    assert_one_line_error(code, err, "every one of the 1 targets is a prompt the patch was hardened on")
