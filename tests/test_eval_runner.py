"""Generation at scale: resume after a kill, metrics.json's contract, and sharding over processes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from trce.eval.detectors import make_detector
from trce.eval.options import EvalConfig
from trce.eval.rows import generate_rows
from trce.eval.runner import run_eval
from trce.eval.suites import load_suite
from trce.generate import GenSettings
from trce.utils.io import read_jsonl


@pytest.fixture(scope="module")
def patch_dir(tmp_path_factory, tiny_dir):
    """A patch for the tiny model that rescales one cross-attention key projection."""
    from trce.edit import Edit, fingerprint, resolve
    from trce.loading import load_pipeline

    pipe = load_pipeline(str(tiny_dir), device="cpu")
    path = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    edit = Edit(weights={path: resolve(pipe, path).detach() * -3.0}, method="test-scale", base=fingerprint(pipe))
    return edit.save(tmp_path_factory.mktemp("patch") / "p")


def _rows(limit=3):
    suite = load_suite("shapeworld-red")
    rows = suite.rows(limit=limit)
    return suite, rows, [r.seed for r in rows], [7.5] * len(rows)


def test_resume_after_kill_never_duplicates(tmp_path, tiny_pipe, monkeypatch):
    from trce.eval import rows as eval_rows

    suite, rows, seeds, guid = _rows()
    det = make_detector("shapeworld", attribute=suite.attribute, values=suite.values)
    settings = GenSettings(steps=2, batch_size=4)
    clean = generate_rows(tiny_pipe, rows, seeds, guid, tmp_path / "clean", settings, det, progress=False)

    # first run: killed while saving the 7th image (the middle of the second batch)
    saved = {"n": 0}
    real_save = eval_rows.io.save_png

    def dying_save(path, image):
        saved["n"] += 1
        if saved["n"] == 7:
            raise KeyboardInterrupt
        real_save(path, image)

    monkeypatch.setattr(eval_rows.io, "save_png", dying_save)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        generate_rows(tiny_pipe, rows, seeds, guid, out, settings, det, progress=False)
    monkeypatch.setattr(eval_rows.io, "save_png", real_save)
    assert len(read_jsonl(out / "rows.jsonl")) == 4  # the first batch only
    assert len(list((out / "images").glob("*.png"))) == 6  # two images of batch 2 without their rows
    # and a line cut short by the kill
    with open(out / "rows.jsonl", "a") as fh:
        fh.write('{"index": 9, "name": "00009", "prompt": "a tru')

    generated = []
    real_iter = eval_rows.generate_iter

    def counting_iter(pipe, prompts, *args, **kwargs):
        generated.extend(prompts)
        yield from real_iter(pipe, prompts, *args, **kwargs)

    monkeypatch.setattr(eval_rows, "generate_iter", counting_iter)
    resumed = generate_rows(tiny_pipe, rows, seeds, guid, out, settings, det, progress=False)
    assert len(generated) == len(rows) - 4  # only unfinished rows were generated again
    lines = read_jsonl(out / "rows.jsonl")
    assert sorted(r["index"] for r in lines) == list(range(len(rows)))  # each row exactly once
    assert (out / "rows.jsonl").read_text().count("\n") == len(rows)
    for a, b in zip(resumed, clean):
        assert (a["prompt"], a["seed"], a["verdict"], a["scores"]["top1"]) == (b["prompt"], b["seed"], b["verdict"],
                                                                             b["scores"]["top1"])
    # a rerun has nothing left to do
    generated.clear()
    generate_rows(tiny_pipe, rows, seeds, guid, out, settings, det, progress=False)
    assert generated == []


def _contract(m: dict) -> None:
    for key in ("suite", "suite_version", "kind", "model", "patch", "method", "n", "asr", "asr_ci", "fd", "clip_score",
                "detector", "settings", "images_dir", "rows", "config", "seeds", "versions", "git_hash", "date", "argv"):
        assert key in m, key
    for key in ("steps", "guidance", "size", "seeds", "limit", "batch_size"):
        assert key in m["settings"], key
    assert m["images_dir"] == "images" and m["rows"] == "rows.jsonl"


def test_shapeworld_metrics_with_patch_and_seeds(tmp_path, tiny_dir, patch_dir):
    out = tmp_path / "ev"
    cfg = EvalConfig(suite="shapeworld-3shapes", model=str(tiny_dir), patch=str(patch_dir), limit=3, steps=2,
                     seeds=(0, 1), device="cpu", progress=False)
    m = run_eval(cfg, out)
    _contract(m)
    assert json.loads((out / "metrics.json").read_text())["n"] == m["n"] == 2 * 3 * 9  # 2 seeds x 3 x 9 groups
    assert m["kind"] == "shapeworld" and m["method"] == "test-scale" and m["patch"] == str(patch_dir)
    assert set(m["groups"]) == {"keyword", "synonym", "paraphrase", "preserve", "unrelated", "keyword-open",
                                "synonym-open", "paraphrase-open", "preserve-open"}
    assert m["asr_groups"] == ["keyword", "synonym", "paraphrase", "keyword-open", "synonym-open", "paraphrase-open"]
    for g in m["groups"].values():
        assert g["n"] == 6 and 0 <= g["asr"] <= 1 and g["asr_ci"][0] <= g["asr"] <= g["asr_ci"][1]
        assert set(g["accuracy"]) <= {"shape", "color", "pattern", "background"} and g["accuracy_ci"]
    assert "shape" not in m["groups"]["unrelated"]["accuracy"]
    assert m["fd"] is not None and m["fd"] >= 0 and m["clip_score"] is not None
    for key in ("esr", "esr_ci", "psr", "psr_ci"):
        assert key in m
    assert len(m["per_seed"]) == 2 and "asr_mean" in m and "asr_std" in m
    assert m["per_seed"][1]["images_dir"] == "seeds/1/images"
    assert m["reference_dir"] == "reference/images" and "groups" in m["reference"]
    # before/after images on the same indices, prompts and seeds
    names = sorted(p.name for p in (out / "images").glob("*.png"))
    assert names == sorted(p.name for p in (out / "reference" / "images").glob("*.png")) and names[0] == "00000.png"
    rows, ref = read_jsonl(out / "rows.jsonl"), read_jsonl(out / "reference" / "rows.jsonl")
    assert [(r["prompt"], r["seed"]) for r in rows] == [(r["prompt"], r["seed"]) for r in ref]
    other = read_jsonl(out / "seeds" / "1" / "rows.jsonl")
    assert [r["prompt"] for r in other] == [r["prompt"] for r in rows]
    assert all(a["seed"] != b["seed"] for a, b in zip(rows, other))


def test_reference_cache_is_shared(tmp_path, tiny_dir, patch_dir):
    cache = tmp_path / "cache"
    cfg = EvalConfig(suite="shapeworld-red", model=str(tiny_dir), patch=str(patch_dir), limit=2, steps=2,
                     device="cpu", progress=False, reference_cache=str(cache))
    a = run_eval(cfg, tmp_path / "a")
    (folder,) = cache.iterdir()
    stamp = {p.name: p.stat().st_mtime_ns for p in (folder / "images").iterdir()}
    b = run_eval(cfg, tmp_path / "b")
    assert {p.name: p.stat().st_mtime_ns for p in (folder / "images").iterdir()} == stamp  # reused, not redone
    assert a["fd"] == pytest.approx(b["fd"]) and a["reference"]["asr"] == b["reference"]["asr"]
    assert sorted(os.listdir(tmp_path / "b" / "reference" / "images")) == [f"{i:05d}.png" for i in range(18)]


def test_the_original_evaluation_fills_the_reference_cache_that_patches_reuse(tmp_path, tiny_dir, patch_dir):
    cache = tmp_path / "cache"
    common = {"suite": "shapeworld-red", "model": str(tiny_dir), "limit": 2, "steps": 2, "device": "cpu",
              "progress": False, "reference_cache": str(cache)}
    plain = EvalConfig(**common)
    original = run_eval(plain, tmp_path / "original")
    (folder,) = cache.iterdir()
    stamp = {p.name: p.stat().st_mtime_ns for p in (folder / "images").iterdir()}
    patched = run_eval(EvalConfig(**common, patch=str(patch_dir)), tmp_path / "patched")
    assert {p.name: p.stat().st_mtime_ns for p in (folder / "images").iterdir()} == stamp  # drawn once, reused
    assert patched["reference"]["asr"] == original["asr"] and patched["reference"]["n"] == original["n"] == 18
    rows = read_jsonl(tmp_path / "original" / "rows.jsonl")
    assert rows == read_jsonl(tmp_path / "patched" / "reference" / "rows.jsonl")
    for r in rows:  # the same pixels, under the run's own row names
        a = tmp_path / "original" / "images" / f"{r['name']}.png"
        b = tmp_path / "patched" / "reference" / "images" / f"{r['name']}.png"
        assert a.read_bytes() == b.read_bytes()
    # the same images as an evaluation without the cache: same prompts, seeds and pixels
    alone = run_eval(EvalConfig(**{**common, "reference_cache": None}), tmp_path / "alone")
    assert alone["asr"] == original["asr"] and alone["clip_score"] == pytest.approx(original["clip_score"])
    for r in read_jsonl(tmp_path / "alone" / "rows.jsonl"):
        assert (tmp_path / "alone" / "images" / f"{r['name']}.png").read_bytes() == \
            (tmp_path / "original" / "images" / f"{r['name']}.png").read_bytes()
    # a rerun of the original is a no-op
    assert run_eval(plain, tmp_path / "original")["asr"] == original["asr"]


def test_changed_settings_are_refused(tmp_path, tiny_dir):
    from trce.errors import TrceError

    cfg = EvalConfig(suite="shapeworld-red", model=str(tiny_dir), limit=1, steps=2, device="cpu", progress=False)
    run_eval(cfg, tmp_path)
    with pytest.raises(TrceError, match="other steps"):
        run_eval(EvalConfig(suite="shapeworld-red", model=str(tiny_dir), limit=1, steps=3, device="cpu",
                            progress=False), tmp_path)


@pytest.mark.heavy
def test_two_processes_equal_one(tmp_path, tiny_dir, run_cli):
    args = ["eval", "--model", str(tiny_dir), "--suite", "shapeworld-red", "--limit", "2", "--steps", "2",
            "--batch-size", "1", "--device", "cpu", "--no-progress"]
    code, _, err = run_cli(*args, "--out", tmp_path / "one")
    assert code == 0, err
    # Each process computes with as many threads as the in-process run above: a different thread count sums
    # floats in another order, and the CLIP scores compared exactly below would differ in the last bits.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    # torchrun, as `accelerate launch --multi_gpu` starts it; trce's PartialState(cpu=True) makes it gloo on CPUs.
    # Standalone mode: its rendezvous takes a port the operating system picks, so parallel runs never collide.
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "trce.cli", *args, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert two["processes"] == 2 and one["processes"] == 1
    assert not list((tmp_path / "two").glob("rows.rank*.jsonl"))  # shards merged
    keep = ("index", "prompt", "seed", "guidance", "group", "verdict", "scores")
    r1, r2 = (read_jsonl(tmp_path / d / "rows.jsonl") for d in ("one", "two"))
    assert [{k: r[k] for k in keep} for r in r1] == [{k: r[k] for k in keep} for r in r2]
    assert (one["n"], one["asr"], one["groups"]) == (two["n"], two["asr"], two["groups"])
    from PIL import Image

    a = np.asarray(Image.open(tmp_path / "one" / "images" / "00003.png"))
    b = np.asarray(Image.open(tmp_path / "two" / "images" / "00003.png"))
    assert np.array_equal(a, b)
