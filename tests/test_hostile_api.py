"""The hostile-input catalogue of the Python API: what a caller of `trce.erase`, `trce.evaluate`, `trce.attack` and
`trce.load_pipeline` can get wrong, and applying or reverting an `Edit` at the wrong time.

Each row is one call on the tiny pipeline, the `TrceError` message it must raise (a regular expression), and the
promise that it was refused before any work: no output folder, nothing left beside it, the pipeline unchanged.
"""

from __future__ import annotations

import re

import pytest
import torch

import trce
from trce.edit import Edit, applied_edits, fingerprint, resolve
from trce.errors import TrceError

RED = "shapeworld-red"
PATH = "text_encoder.final_layer_norm.weight"


def erase(pipe, out, **kw):
    return trce.erase(pipe, kw.pop("concept", RED), progress=False, **kw)


def evaluate(pipe, out, **kw):
    return trce.evaluate(pipe, kw.pop("suite", RED), out=out, progress=False, **kw)


def attack(pipe, out, **kw):
    return trce.attack(pipe, kw.pop("suite", RED), kw.pop("attack", "ring-a-bell"), out=out, progress=False, **kw)


def load(pipe, out, **kw):
    return trce.load_pipeline(kw.pop("model", "shapeworld"), **kw)


CASES = [
    # 1. erase: the concept and the stages
    ("erase-concept-int", erase, {"concept": 42},
     r"^concept must be a name, a spec path, a ConceptSpec or a list of them, got int 42$"),
    ("erase-concept-item", erase, {"concept": [RED, 3]}, r"^a concept is a name, a spec path or a ConceptSpec, got int 3"),
    ("erase-stages-int", erase, {"stages": 1},
     r"^stages must be stage names of method 'trce' \(T, V\) as 'T,V' or a list, got 1$"),
    ("erase-stages-list-of-int", erase, {"stages": [1]}, r"^stages must be stage names .*, got \[1\]$"),
    ("erase-seed-float", erase, {"seed": 1.5}, r"^seed must be an integer, got 1\.5$"),
    ("erase-robust-float", erase, {"robust": 1.5}, r"robust must be an integer >= 0, got 1\.5"),
    # 2. attack: the suite, the attack and its budget
    ("attack-suite-int", attack, {"suite": 42},
     r"^suite must be a suite name \(see trce\.suites\(\)\) or a suite YAML path, got 42$"),
    ("attack-name-int", attack, {"attack": 42}, r"^attack must be the name of an attack \(ring-a-bell, .*\), got 42$"),
    ("attack-budget-int", attack, {"budget": 5},
     r"^budget must be a ring-a-bell Budget, a mapping of its fields or 'key=value' text .*, got int 5$"),
    # the CLI's own parsing of `--budget key=value`, with its messages
    ("attack-budget-bare-word", attack, {"budget": "fast"}, r"^--budget takes key=value pairs, got 'fast'$"),
    ("attack-budget-bad-value", attack, {"budget": {"generations": "many"}},
     r"^ring-a-bell budget generations must be int, got 'many'$"),
    ("attack-budget-unknown-key", attack, {"budget": ["generation=2"]},
     r"^unknown ring-a-bell budget key 'generation' \(did you mean 'generations'\?\)"),
    ("attack-out-int", attack, {"out": 42}, r"^out must be a folder path, got 42$"),
    ("attack-edit-int", attack, {"edit": 42},
     r"^edit must be an Edit \(from trce\.erase or trce\.load_patch\) or a patch folder, got int 42$"),
    # 3. load_pipeline: the patch and the model
    ("load-patch-int", load, {"patch": 42},
     r"^patch must be an Edit \(from trce\.erase or trce\.load_patch\) or a patch folder, got int 42$"),
    ("load-patch-missing", load, {"patch": "{tmp}/nope"}, r"^patch .*nope does not exist$"),
    ("load-model-int", load, {"model": 42},
     r"^model must be a built-in model name, a diffusers folder or a hub id, got 42$"),
    # 4. evaluate: the edit (a patch folder is taken; anything else that is not an Edit is refused)
    ("eval-edit-missing-folder", evaluate, {"edit": "{tmp}/a/path"}, r"^patch .*a/path does not exist$"),
    ("eval-edit-int", evaluate, {"edit": 42},
     r"^edit must be an Edit \(from trce\.erase or trce\.load_patch\) or a patch folder, got int 42$"),
    ("eval-suite-int", evaluate, {"suite": 42},
     r"^suite must be a suite name \(see trce\.suites\(\)\) or a suite YAML path, got 42$"),
    ("eval-out-int", evaluate, {"out": 42}, r"^out must be a folder path, got 42$"),
    # 5. numbers: the CLI's messages (`trce.errors.check_integer`)
    ("eval-limit-float", evaluate, {"limit": 1.5}, r"^limit must be an integer, got 1\.5$"),
    ("eval-limit-zero", evaluate, {"limit": 0}, r"^limit must be at least 1, got 0$"),
    ("eval-limit-bool", evaluate, {"limit": True}, r"^limit must be an integer, got True$"),
    ("eval-steps-float", evaluate, {"steps": 2.0}, r"^steps must be an integer, got 2\.0$"),
    ("eval-batch-size-zero", evaluate, {"batch_size": 0}, r"^batch_size must be at least 1, got 0$"),
    ("eval-size-odd", evaluate, {"size": 30}, r"^size must be a positive multiple of 8 .*, got 30$"),
    ("eval-guidance-negative", evaluate, {"guidance": -1}, r"^guidance must be a finite number >= 0 .*, got -1$"),
    ("eval-threshold-text", evaluate, {"threshold": "high"}, r"^threshold must be a finite number, got 'high'$"),
    ("eval-seeds-float", evaluate, {"seeds": 1.5}, r"^seeds must be integers, got \(1\.5,\)$"),
    ("attack-limit-float", attack, {"limit": 1.5}, r"^limit must be an integer, got 1\.5$"),
    ("attack-seed-float", attack, {"seed": 0.5}, r"^seed must be an integer, got 0\.5$"),
    ("attack-steps-zero", attack, {"steps": 0}, r"^steps must be at least 1, got 0$"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_bad_argument_is_one_clear_error_before_any_work(case, tiny_pipe, tmp_path, monkeypatch):
    name, call, kwargs, pattern = case
    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    runs.mkdir()
    kwargs = {k: v.replace("{tmp}", str(runs)) if isinstance(v, str) else v for k, v in kwargs.items()}
    before = resolve(tiny_pipe, PATH).detach().clone()
    out = kwargs.pop("out", runs / "out")
    with pytest.raises(TrceError, match=pattern) as info:
        call(tiny_pipe, out, **kwargs)
    assert type(info.value) is TrceError and "\n" not in str(info.value)
    assert not list(runs.iterdir()), f"{name} left {sorted(p.name for p in runs.iterdir())}"
    assert not (tmp_path / "cache").exists() or name.startswith("erase")
    assert not applied_edits(tiny_pipe) and torch.equal(resolve(tiny_pipe, PATH), before)


# --------------------------------------------------------------------------- evaluate takes a patch folder
def test_evaluate_and_attack_take_a_patch_folder_for_edit(tiny_pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    before = resolve(tiny_pipe, PATH).detach().clone()
    edit = Edit(weights={PATH: before * 2}, method="toy", spec={"name": RED}, base=fingerprint(tiny_pipe))
    edit.save(tmp_path / "patch")
    by_folder = trce.evaluate(tiny_pipe, RED, edit=str(tmp_path / "patch"), limit=1, steps=1, out=tmp_path / "a",
                              progress=False)
    by_edit = trce.evaluate(tiny_pipe, RED, edit=trce.load_patch(tmp_path / "patch"), limit=1, steps=1,
                            out=tmp_path / "b", progress=False)
    assert by_folder["asr"] == by_edit["asr"] and by_folder["n"] == by_edit["n"]
    assert not applied_edits(tiny_pipe) and torch.equal(resolve(tiny_pipe, PATH), before)


# --------------------------------------------------------------------------- an Edit knows whether it is applied
def _edit(pipe, name: str, scale: float) -> Edit:
    return Edit(weights={PATH: resolve(pipe, PATH).detach() * scale}, method="toy", spec={"name": name},
                base=fingerprint(pipe))


def test_an_edit_applied_twice_is_refused_and_the_pipeline_kept(tiny_pipe):
    before = resolve(tiny_pipe, PATH).detach().clone()
    red = _edit(tiny_pipe, "red", 2.0)
    assert not red.is_applied(tiny_pipe)
    red.apply(tiny_pipe)
    assert red.is_applied(tiny_pipe)
    with pytest.raises(TrceError, match=r"^the toy edit of 'red' is already applied to this pipeline$"):
        red.apply(tiny_pipe)
    with pytest.raises(TrceError, match="is already applied"), red.applied(tiny_pipe):
        pass
    assert applied_edits(tiny_pipe) == [red] and torch.equal(resolve(tiny_pipe, PATH), before * 2)
    red.revert(tiny_pipe)
    assert not red.is_applied(tiny_pipe) and torch.equal(resolve(tiny_pipe, PATH), before)


def test_a_second_edit_is_refused_naming_the_applied_one_not_the_base_model(tiny_pipe, tmp_path):
    red, star = _edit(tiny_pipe, "red", 2.0), _edit(tiny_pipe, "star", 3.0)
    with red.applied(tiny_pipe):
        with pytest.raises(TrceError) as info:
            star.apply(tiny_pipe)
        assert re.fullmatch(r"the toy edit of 'red' is already applied to this pipeline; revert it first "
                            r"\(edit\.revert\(pipe\)\) to apply the toy edit of 'star'", str(info.value))
        assert "base model" not in str(info.value)
        # evaluate with an edit on a pipeline that holds another: the same message, before any folder is made
        with pytest.raises(TrceError, match="the toy edit of 'red' is already applied"):
            trce.evaluate(tiny_pipe, RED, edit=star, limit=1, steps=1, out=tmp_path / "o", progress=False)
        with pytest.raises(TrceError, match="the toy edit of 'red' is already applied"):
            trce.attack(tiny_pipe, RED, "ring-a-bell", edit=star, limit=1, steps=1, out=tmp_path / "o", progress=False)
        assert applied_edits(tiny_pipe) == [red] and not (tmp_path / "o").exists()
    assert not applied_edits(tiny_pipe)
    # a patch loaded with the pipeline: the hint names pipe.trce_patch
    red.save(tmp_path / "red")
    tiny_pipe.trce_patch = None
    patch = trce.load_patch(tmp_path / "red")
    patch.apply(tiny_pipe)
    tiny_pipe.trce_patch = patch
    with pytest.raises(TrceError, match=r"of 'red' \(patch .*red\) is already applied to this pipeline; revert it "
                                        r"first \(pipe\.trce_patch\.revert\(pipe\)\)"):
        star.apply(tiny_pipe)
    with pytest.raises(TrceError, match=r"is already applied to this pipeline \(the same patch\)$"):
        trce.load_patch(tmp_path / "red").apply(tiny_pipe)
    patch.revert(tiny_pipe)
    assert tiny_pipe.trce_patch is None and not applied_edits(tiny_pipe)


def test_reverting_an_edit_that_is_not_applied_or_out_of_order(tiny_pipe):
    before = resolve(tiny_pipe, PATH).detach().clone()
    red, star = _edit(tiny_pipe, "red", 2.0), _edit(tiny_pipe, "star", 3.0)
    with pytest.raises(TrceError, match=r"^the toy edit of 'red' is not applied to this pipeline$"):
        red.revert(tiny_pipe)
    red.apply(tiny_pipe)
    red.revert(tiny_pipe)
    with pytest.raises(TrceError, match=r"^the toy edit of 'red' is not applied to this pipeline$"):
        red.revert(tiny_pipe)  # reverted twice
    # stacked on purpose (check_base=False, as a method's later stages are): reverting out of order is refused
    red.apply(tiny_pipe)
    star.apply(tiny_pipe, check_base=False)
    with pytest.raises(TrceError, match=r"^the toy edit of 'red' is not the last edit applied to the pipeline "
                                        r"\(the toy edit of 'star' is\); revert edits in reverse order$"):
        red.revert(tiny_pipe)
    star.revert(tiny_pipe)
    red.revert(tiny_pipe)
    assert not applied_edits(tiny_pipe) and torch.equal(resolve(tiny_pipe, PATH), before)


def test_an_interrupted_apply_leaves_the_pipeline_as_it_was(tiny_pipe, monkeypatch):
    before = {p: t.detach().clone() for p, t in tiny_pipe.text_encoder.named_parameters()}
    paths = ["text_encoder.final_layer_norm.weight", "text_encoder.final_layer_norm.bias"]
    edit = Edit(weights={p: resolve(tiny_pipe, p).detach() + 1 for p in paths}, method="toy",
                base=fingerprint(tiny_pipe))
    real = torch.Tensor.copy_
    calls = []

    def flaky(self, src, *args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, src, *args, **kw)

    monkeypatch.setattr(torch.Tensor, "copy_", flaky)
    with pytest.raises(KeyboardInterrupt):
        edit.apply(tiny_pipe)
    monkeypatch.setattr(torch.Tensor, "copy_", real)
    assert not edit.is_applied(tiny_pipe) and not applied_edits(tiny_pipe)
    assert all(torch.equal(t, before[p]) for p, t in tiny_pipe.text_encoder.named_parameters())


def test_probe_findings_in_python(tmp_path):
    """Found by a probe of the Python API: each ends in a TrceError naming the bad value."""
    import trce
    from trce.edit import Edit
    from trce.testing import tiny_pipeline

    edit = Edit(weights={}, method="toy", spec={"name": "red"})
    for call in (lambda: edit.apply("notapipe"), lambda: edit.revert(None)):
        with pytest.raises(trce.TrceError, match="pipe must be a diffusers pipeline"):
            call()
    with pytest.raises(trce.TrceError, match="V= sets stage V, which this run does not run"):
        trce.erase(tiny_pipeline(), "shapeworld-red", stages="T", V={"lr": float("nan")}, cache=tmp_path / "c",
                   progress=False)
    with pytest.raises(trce.TrceError, match="has no metrics.json"):  # one path: read as one run, not its letters
        trce.report(str(tmp_path), tmp_path / "r.html")
