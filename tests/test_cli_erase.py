"""`trce erase`, `trce export`, `trce concepts` end to end on a tiny pipeline, refused patches included."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from trce.concepts import load_spec
from trce.edit import _sha256, fingerprint, load_patch, resolve
from trce.loading import load_pipeline
from trce.testing import assert_one_line_error, tiny_pipeline_dir
from trce.utils import io

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("TRCE_CACHE", str(folder))
    return folder


@pytest.fixture()
def red_patch(tiny_dir, tmp_path, run_cli, cache):
    out = tmp_path / "red"
    code, out_text, err = run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--stages", "T", "--out", out)
    assert code == 0, err
    assert "erased shapeworld-red with trce stage T" in out_text
    return out


def test_erase_writes_a_complete_patch(red_patch, tiny_dir):
    meta = io.read_json(red_patch / "patch.json")
    assert meta["method"] == "trce" and meta["spec"]["name"] == "shapeworld-red"
    assert meta["spec"]["attribute"] == "color" and meta["spec"]["value"] == "red"
    assert meta["settings"]["stage"] == "T" and meta["settings"]["eta"] == 0.01  # the spec's default (the paper's η)
    assert meta["settings"]["token_role"] == "eot"
    for key in ("versions", "git_hash", "date", "seeds", "config", "base"):
        assert key in meta
    assert meta["seeds"] == {"seed": 0} and meta["config"]["concepts"] == ["shapeworld-red"]
    assert all(".attn2.to_" in p for p in meta["tensors"])
    pipe = load_pipeline(str(tiny_dir))
    assert meta["base"]["id"] == fingerprint(pipe)["id"]
    # `load_pipeline(patch=...)` (what `trce generate --patch` uses) applies exactly these weights.
    edit = load_patch(red_patch)
    patched = load_pipeline(str(tiny_dir), patch=red_patch)
    for path, value in edit.weights.items():
        assert torch.equal(resolve(patched, path).detach(), value)
        assert not torch.equal(resolve(pipe, path).detach(), value)


def test_generate_with_the_patch(red_patch, tiny_dir, tmp_path, run_cli):
    code, _, err = run_cli("generate", "--model", tiny_dir, "--patch", red_patch, "--prompt", "a crimson star",
                           "--steps", "2", "--out", tmp_path / "x.png")
    assert code == 0, err
    assert (tmp_path / "x.png").stat().st_size > 0
    assert io.read_json(tmp_path / "x.json")["config"]["patch"] == str(red_patch)


def test_config_file_and_flag_precedence(tiny_dir, tmp_path, run_cli, cache):
    spec = tmp_path / "cats.yaml"
    spec.write_text(yaml.safe_dump({"name": "cats", "erase": {"target": "a dog", "expressions": ["a cat", "a kitten"]},
                                    "templates": ["a photo of {}"], "preserve": {"prompts": ["a red circle"]}}))
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"concept": str(spec), "eta": 0.2, "token-role": "eot-all", "seed": 3}))
    code, out, err = run_cli("erase", "--model", tiny_dir, "--config", run, "--eta", "0.05", "--stages", "T",
                             "--out", tmp_path / "c")
    assert code == 0, err
    meta = io.read_json(tmp_path / "c" / "patch.json")
    assert meta["settings"]["eta"] == 0.05 and meta["settings"]["token_role"] == "eot-all"  # flag > file > spec
    assert meta["seeds"] == {"seed": 3} and meta["spec"]["name"] == "cats"
    assert "cats" in out and "tensors" in out
    code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", spec, "--method", "trce-key", "--out",
                           tmp_path / "u")
    assert code == 0, err
    meta = io.read_json(tmp_path / "u" / "patch.json")
    assert meta["method"] == "trce-key" and meta["settings"]["token_role"] == "key"
    bad = tmp_path / "bad.yaml"
    bad.write_text("concept: cats\nlearning_rate: 3\n")
    assert_one_line_error(*run_cli("erase", "--model", tiny_dir, "--config", bad, "--out", tmp_path / "b")[::2],
                    "unknown setting 'learning_rate'", str(bad))


def test_two_concepts_in_one_patch(tiny_dir, tmp_path, run_cli, cache):
    code, out, err = run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red,shapeworld-star",
                             "--stages", "T", "--eta", "0.01", "--out", tmp_path / "two")
    assert code == 0, err
    assert "shapeworld-red+shapeworld-star" in out
    meta = io.read_json(tmp_path / "two" / "patch.json")
    assert meta["spec"]["name"] == "shapeworld-red+shapeworld-star"
    assert meta["info"]["pairs"] == len(load_spec("shapeworld-red").pairs()) + len(load_spec("shapeworld-star").pairs())


@pytest.mark.parametrize("args, needles", [
    (["--concept", "shapeworld-rde"], ["unknown concept 'shapeworld-rde'", "did you mean 'shapeworld-red'",
                                        "available:", "sexual"]),
    (["--concept", "shapeworld-red", "--method", "esd-x"], ["unknown method 'esd-x'", "available: advunlearn, esd, kpop, rece, trce, trce-key, uce"]),
    (["--concept", "shapeworld-red", "--stages", "X"], ["method 'trce' has no stage 'X'"]),
    (["--concept", "shapeworld-red", "--method", "uce", "--stages", "V"], ["method 'uce' has no stage 'V'"]),
    (["--concept", "shapeworld-red", "--method", "trce-key", "--token-role", "eot"],
     ["the [KEY] ablation (trce-key) maps the keyword tokens"]),
    (["--concept", "shapeworld-red", "--method", "uce", "--token-role", "eot"],
     ["--token-role is a setting of stage T, which method 'uce' does not have"]),
    (["--concept", "shapeworld-red", "--token-role", "eos"], ["unknown token role 'eos'"]),
    (["--concept", "shapeworld-red", "--eta", "-1"], ["--eta must be a number >= 0"]),
    (["--concept", "sexual"], ["pass --data DIR"]),
    ([], ["no concept given"]),
])
def test_erase_mistakes_are_one_line(tiny_dir, tmp_path, run_cli, cache, monkeypatch, args, needles):
    monkeypatch.delenv("TRCE_DATA", raising=False)
    code, _, err = run_cli("erase", "--model", tiny_dir, *args, "--out", tmp_path / "p")
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "p").exists()


def test_erase_refuses_to_replace_a_foreign_folder(tiny_dir, tmp_path, run_cli, cache):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", "red", "--out", tmp_path / "mine")
    assert_one_line_error(code, err, "holds files trce did not write (notes.txt)")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_export_writes_a_loadable_pipeline(red_patch, tiny_dir, tmp_path, run_cli):
    out = tmp_path / "exported"
    code, text, err = run_cli("export", "--model", tiny_dir, "--patch", red_patch, "--out", out)
    assert code == 0, err
    assert f"-> {out}" in text
    assert (out / "model_index.json").exists() and (out / "trce-export.json").exists()
    record = io.read_json(out / "trce-export.json")
    assert record["patch"]["method"] == "trce" and record["config"]["patch"] == str(red_patch)
    exported = load_pipeline(str(out))
    patched = load_pipeline(str(tiny_dir), patch=red_patch)
    a, b = exported.unet.state_dict(), patched.unet.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rewrite_weights(folder: Path, change) -> None:
    """Change the patch's tensors and keep its metadata consistent (checksums, shapes)."""
    weights = io.load_tensors(folder / "weights.safetensors")
    change(weights)
    io.save_tensors(folder / "weights.safetensors", weights)
    meta = io.read_json(folder / "patch.json")
    meta["files"]["weights.safetensors"] = _sha256(folder / "weights.safetensors")
    meta["tensors"] = {k: list(v.shape) for k, v in weights.items()}
    io.write_json(folder / "patch.json", meta)


@pytest.mark.parametrize("command", ["generate", "export"])
def test_refused_patches(red_patch, tiny_dir, tmp_path, run_cli, command):
    other = tiny_pipeline_dir(tmp_path / "other", seed=1)  # same architecture, other weights

    def run(model, patch):
        target = ["--prompt", "a red star", "--steps", "1", "--out", tmp_path / "x.png"] if command == "generate" \
            else ["--out", tmp_path / "exported"]
        return run_cli(command, "--model", model, "--patch", patch, *target)

    code, _, err = run(other, red_patch)
    assert_one_line_error(code, err, "made for base model", "fingerprint")

    wrong = tmp_path / "wrong-shape"
    wrong.mkdir()
    for f in red_patch.iterdir():
        (wrong / f.name).write_bytes(f.read_bytes())
    first = min(io.read_json(wrong / "patch.json")["tensors"])
    _rewrite_weights(wrong, lambda w: w.__setitem__(first, torch.zeros(3, 5)))
    code, _, err = run(tiny_dir, wrong)
    assert_one_line_error(code, err, first, "shape (3, 5)")

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in red_patch.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes())
    data = (truncated / "weights.safetensors").read_bytes()
    (truncated / "weights.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run(tiny_dir, truncated)
    assert_one_line_error(code, err, "corrupt or truncated")

    code, _, err = run(tiny_dir, tmp_path / "nowhere")
    assert_one_line_error(code, err, "does not exist")
    assert not (tmp_path / "exported").exists() and not (tmp_path / "x.png").exists()


def test_concepts_list_show_and_unknown(run_cli, tmp_path):
    code, out, _ = run_cli("concepts")
    assert code == 0
    for name in ("sexual", "i2p", "van-gogh", "shapeworld-red", "shapeworld-3shapes"):
        assert name in out
    assert "color=red" in out and "nudity" in out
    code, out, _ = run_cli("concepts", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert rows["sexual"]["expressions"] == 20 and rows["shapeworld-red"]["values"] == ["red"]
    code, out, _ = run_cli("concepts", "show", "nudity")
    assert code == 0 and yaml.safe_load(out)["name"] == "sexual"
    code, out2, _ = run_cli("concepts", "--show", "sexual")
    assert code == 0 and out2 == out
    assert_one_line_error(*run_cli("concepts", "show", "vangog")[::2], "unknown concept 'vangog'", "van-gogh")
    assert_one_line_error(*run_cli("concepts", "list", "all")[::2], "trce concepts show NAME")


def test_real_text_spec_with_shared_coco(tiny_dir, tmp_path, run_cli, cache):
    """The `sexual` spec on a 32-token tokenizer: long prompts are truncated, COCO comes from --data."""
    if not (DATA / "prompts" / "coco_30k.csv").exists():
        pytest.skip("shared data folder absent")
    code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", "nudity", "--method", "uce", "--data", DATA,
                           "--set", "uce.preserve=spec", "--set", "uce.prompts=pairs", "--out", tmp_path / "s")
    assert code == 0, err
    meta = io.read_json(tmp_path / "s" / "patch.json")  # UCE retains '' and, with preserve=spec, the COCO captions
    assert meta["spec"]["name"] == "sexual" and 991 <= meta["info"]["retain_texts"] <= 1001
    assert meta["info"]["texts"] == 300 and meta["info"]["erase_rows"] > 0
