"""The library is the product: the README's Python section runs as written, `trce erase` and `trce.erase` give
the same patch bit for bit, a method plugs in with one module and one registry line, and the model family is the
one place that knows the architecture."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import trce
from trce.edit import applied_edits, load_patch, resolve
from trce.errors import TrceError
from trce.families import family_of
from trce.registry import Method, Stage, register, unregister
from trce.testing import assert_one_line_error

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_python() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert blocks, "the README's Python section has no ```python block"
    return "\n".join(blocks)


@pytest.mark.heavy
def test_the_readme_python_section_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    exec(compile(_readme_python(), str(README), "exec"), {"__name__": "readme"})  # noqa: S102


def test_the_top_level_api_lists_what_exists():
    assert {"trce", "uce", "trce-key", "rece", "kpop", "esd", "advunlearn"} <= set(trce.methods())
    assert "shapeworld-red" in trce.concepts() and "shapeworld-red" in trce.suites()
    assert trce.attacks() == ["ring-a-bell", "mma-text", "unlearndiff", "soft-prompt"] and "sd1" in trce.families()
    assert trce.load_concept("red").name == "shapeworld-red"
    from trce.methods import erase

    assert trce.erase is erase  # the package stays a package; calling it lists the names
    with pytest.raises(AttributeError):
        trce.no_such_thing  # noqa: B018


# --------------------------------------------------------------------------- the CLI is one library call
SHAPEWORLD = ("shapeworld-red", "shapeworld-star", "shapeworld-striped", "shapeworld-3shapes")
TINY = {  # stage settings small enough for the tiny pipeline; --set and the Python mapping give the same config
    "trce": {"V": {"n_trajectories": 2, "n_uncond": 4, "ddim_steps": 2, "epochs": 1, "checkpoint_every": 1}},
    "uce": {},
    "trce-key": {},
    "rece": {"rece": {"robust": 1}},
    "kpop": {"kpop": {"iterations": 2, "ddim_steps": 2, "latents": "current", "batch_size": 2}},
    "esd": {"esd": {"iterations": 2, "ddim_steps": 2, "latents": "current", "batch_size": 2}},
    "advunlearn": {"advunlearn": {"iterations": 2, "warmup": 0, "attack_steps": 1, "ddim_steps": 2,
                                  "latents": "current", "batch_size": 2, "preserve_batch": 2}},
}


@pytest.mark.parametrize("concept", SHAPEWORLD)
@pytest.mark.heavy
def test_cli_and_python_erase_give_bit_identical_patches(concept, tiny_dir, tmp_path, run_cli, monkeypatch):
    assert set(TINY) == set(trce.methods())  # a new method gets a row here
    pipe = trce.load_pipeline(str(tiny_dir))
    for method, settings in TINY.items():
        sets = [f"{stage}.{k}={v}" for stage, values in settings.items() for k, v in values.items()]
        monkeypatch.setenv("TRCE_CACHE", str(tmp_path / f"cli-{method}"))
        code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", concept, "--method", method,
                               *[a for s in sets for a in ("--set", s)], "--seed", 3, "--out", tmp_path / method)
        assert code == 0, err
        monkeypatch.setenv("TRCE_CACHE", str(tmp_path / f"py-{method}"))
        edit = trce.erase(pipe, concept, method=method, seed=3, progress=False, **settings)
        cli = load_patch(tmp_path / method)
        assert set(cli.weights) == set(edit.weights) and cli.extras.keys() == edit.extras.keys(), method
        for path, value in edit.weights.items():
            assert torch.equal(cli.weights[path], value), (method, path)
        for name, value in edit.extras.items():
            assert torch.equal(cli.extras[name], value), (method, name)
        assert cli.settings == trce.load_patch(edit.save(tmp_path / f"py-{method}-patch")).settings


def test_unknown_stages_and_settings_are_refused_by_name(tiny_pipe):
    with pytest.raises(TrceError, match="method 'uce' has no stage 'V'"):
        trce.erase(tiny_pipe, "shapeworld-red", method="uce", V={"lr": 1e-4})
    with pytest.raises(TrceError, match=r"unknown kpop setting 'iteration' \(did you mean 'iterations'\?\)"):
        trce.erase(tiny_pipe, "shapeworld-red", method="kpop", kpop={"iteration": 3})
    with pytest.raises(TrceError, match=r"unknown method 'kpopp' \(did you mean 'kpop'\?\)"):
        trce.erase(tiny_pipe, "shapeworld-red", method="kpopp")
    with pytest.raises(TrceError, match="unknown concept 'shapeworld-redd'"):
        trce.erase(tiny_pipe, "shapeworld-redd")
    with pytest.raises(TrceError, match=r"setting V.lr='fast' is not a valid float"):
        trce.erase(tiny_pipe, "shapeworld-red", V={"lr": "fast"})


# --------------------------------------------------------------------------- a toy method plugs in
@pytest.fixture()
def toy():
    method = register(Method(name="toy", display="Toy", description="scales the text projections (a test)",
                             stages=(Stage("toy", "toy_method:run", "toy_method:ToyConfig"),)))
    yield method
    unregister("toy")


def test_a_method_plugs_in_with_one_module_and_one_registry_line(toy, tiny_dir, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    assert "toy" in trce.methods()
    code, out, err = run_cli("methods")
    assert code == 0 and "toy" in out and "scale=0.5" in out
    code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--method", "toy",
                           "--set", "toy.scale=0.25", "--out", tmp_path / "toy")
    assert code == 0, err
    pipe = trce.load_pipeline(str(tiny_dir))
    edit = trce.erase(pipe, "shapeworld-red", method="toy", toy={"scale": 0.25})
    cli = load_patch(tmp_path / "toy")
    assert all(torch.equal(cli.weights[p], v) for p, v in edit.weights.items()) and cli.method == "toy"
    # a spec may recommend the new method's settings; they are checked through the registry
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: cats\nerase: {target: a dog, expressions: [a cat]}\ntemplates: ['a photo of {}']\n"
                    "settings: {toy: {scale: 2.0}}\n")
    code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", spec, "--method", "toy", "--out", tmp_path / "t2")
    assert_one_line_error(code, err, "settings.toy", "scale must be in (0, 1], got 2.0")
    from trce.report.runs import run_label

    assert run_label({"patch": str(tmp_path / "toy"), "method": "toy"}) == "Toy"


# --------------------------------------------------------------------------- the model family
def test_the_family_names_the_text_layers_and_the_training_groups(tiny_pipe):
    fam = family_of(tiny_pipe)
    assert fam.name == "sd1" and trce.family_of(tiny_pipe) is fam
    unet = tiny_pipe.unet
    attn2 = {n for n, _ in unet.named_modules() if n.endswith("attn2")}
    assert set(fam.text_projections(tiny_pipe)) == {f"unet.{n}.{p}.weight" for n in attn2 for p in ("to_k", "to_v")}
    visual = fam.trainable(unet, "visual")
    assert visual and all(".attn1." in n or ".attn2.to_q." in n for n in visual)
    cross, rest = fam.trainable(unet, "cross-attn"), fam.trainable(unet, "non-cross-attn")
    assert all(".attn2." in n for n in cross) and not set(cross) & set(rest)
    assert not any(n.startswith(("time_embedding.", "conv_out.")) for n in rest)
    with pytest.raises(TrceError, match="unknown parameter group 'visuals'"):
        fam.trainable(unet, "visuals")
    cond = fam.encode(tiny_pipe, ["a red circle", ""])
    assert cond.shape == (2, tiny_pipe.tokenizer.model_max_length, fam.text_width(tiny_pipe))
    assert list(fam.components(tiny_pipe)) == ["unet", "text_encoder", "vae"]


def test_an_unknown_architecture_is_refused_by_name():
    from trce.families import family_for_class

    class Mystery:
        pass

    with pytest.raises(TrceError, match="trce does not know the architecture of a Mystery"):
        family_of(Mystery())
    with pytest.raises(TrceError, match="no model family for KandinskyPipeline"):
        family_for_class("KandinskyPipeline")


def test_edit_paths_name_any_component_and_a_loaded_patch_can_be_reverted(tiny_dir, tmp_path):
    pipe = trce.load_pipeline(str(tiny_dir))
    path = "text_encoder.final_layer_norm.weight"
    before = resolve(pipe, path).detach().clone()
    edit = trce.Edit(weights={path: before * 2}, method="toy", base=None)
    edit.save(tmp_path / "p")
    patched = trce.load_pipeline(str(tiny_dir), patch=tmp_path / "p")
    assert torch.equal(resolve(patched, path), before * 2) and applied_edits(patched) == [patched.trce_patch]
    patched.trce_patch.revert(patched)
    assert torch.equal(resolve(patched, path), before) and patched.trce_patch is None and not applied_edits(patched)
    with pytest.raises(TrceError, match="no component 'text_encoder_2'"):
        resolve(pipe, "text_encoder_2.foo.weight")


# --------------------------------------------------------------------------- evaluate and attack take objects
def test_evaluate_takes_a_pipeline_and_an_edit_and_matches_the_cli(tiny_dir, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    assert run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--stages", "T",
                   "--out", tmp_path / "red")[0] == 0
    code, _, err = run_cli("eval", "--model", tiny_dir, "--patch", tmp_path / "red", "--suite", "shapeworld-red",
                           "--limit", 2, "--steps", 2, "--out", tmp_path / "cli")
    assert code == 0, err
    pipe = trce.load_pipeline(str(tiny_dir))
    edit = trce.load_patch(tmp_path / "red")
    metrics = trce.evaluate(pipe, "shapeworld-red", edit=edit, limit=2, steps=2, out=tmp_path / "py", progress=False)
    import json

    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    for key in ("asr", "groups", "fd", "clip_score", "n"):
        assert metrics[key] == cli[key], key
    assert metrics.path == tmp_path / "py" / "metrics.json" and "keyword" in metrics.table()
    assert not applied_edits(pipe)  # the pipeline is left as it was
    again = trce.evaluate(pipe, "shapeworld-red", edit=edit, limit=2, steps=2, out=tmp_path / "py", progress=False)
    assert again["groups"] == metrics["groups"]  # resumed: nothing drawn twice, same numbers
    in_memory = trce.evaluate(pipe, "shapeworld-red", edit=edit, limit=2, steps=2, progress=False)  # no folder
    assert in_memory["asr"] == metrics["asr"]
    with pytest.raises(TrceError, match=r"unknown evaluate option 'limits' \(did you mean 'limit'\?\)"):
        trce.evaluate(pipe, "shapeworld-red", limits=3)


def test_attack_takes_a_pipeline_and_an_edit_and_matches_the_cli(tiny_dir, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    assert run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--stages", "T",
                   "--out", tmp_path / "red")[0] == 0
    args = ("--suite", "shapeworld-red", "--attack", "ring-a-bell", "--limit", 2, "--steps", 2)
    code, _, err = run_cli("attack", "--model", tiny_dir, "--patch", tmp_path / "red", *args,
                           "--budget", "generations=2", "population=4", "elite=2", "--out", tmp_path / "cli")
    assert code == 0, err
    pipe = trce.load_pipeline(str(tiny_dir))
    result = trce.attack(pipe, "shapeworld-red", "ring-a-bell", edit=trce.load_patch(tmp_path / "red"),
                         budget={"generations": 2, "population": 4, "elite": 2}, limit=2, steps=2, out=tmp_path / "py",
                         progress=False)
    import json

    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert result["attack"]["asr_before"] == cli["attack"]["asr_before"]
    assert [r.prompt for r in result.results] == [json.loads(line)["prompt"] for line in
                                                  (tmp_path / "cli" / "results.jsonl").read_text().splitlines()]
    assert "ASR before" in result.summary() and not applied_edits(pipe)
