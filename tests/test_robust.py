"""Hardened stage T (`robust=R`) and RECE: the closed-form adversary is the minimiser of RECE's objective, each
round adds rows and re-solves with the same prior, hardening pushes the next round's adversaries further from the
concept, and both run from the CLI and from Python with their settings recorded (RECE's parity with its authors'
code: test_uce_rece_parity.py)."""

from __future__ import annotations

import json

import pytest
import torch

import trce
from trce.errors import TrceError
from trce.methods.robust import closed_form_adversaries, concept_distance, layer_gram
from trce.methods.stage_t import StageTConfig
from trce.testing import assert_one_line_error


def test_the_closed_form_adversary_minimises_rece_objective():
    gen = torch.Generator().manual_seed(0)
    d = 6
    ws = [torch.randn(5, d, generator=gen, dtype=torch.float64) for _ in range(3)]
    gram = sum(w.T @ w for w in ws)
    t = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=gen, dtype=torch.float64)
    ec = torch.randn(4, d, generator=gen, dtype=torch.float64)
    reg = 0.05
    adv = closed_form_adversaries(gram, t, ec, reg).requires_grad_(True)
    lam = reg * float(torch.trace(t.T @ gram @ t)) / d
    loss = sum(((adv @ (w @ t).T - ec @ w.T) ** 2).sum() for w in ws) + lam * (adv ** 2).sum()
    (grad,) = torch.autograd.grad(loss, adv)
    assert grad.abs().max() < 1e-8  # the gradient vanishes: the minimiser
    assert concept_distance(gram, torch.eye(d, dtype=torch.float64), ec, ec, ec + 1) == 0.0


def test_a_round_maps_its_adversaries_onto_the_safe_rows():
    """The adversaries found against the plain edit are mapped closer to their safe rows by the re-solve, and the
    spec's own rows stay mapped (the property the rounds are for)."""
    from trce.methods.closed_form import solve_transform
    from trce.methods.robust import harden

    gen = torch.Generator().manual_seed(1)
    d, n = 8, 20
    ws = [torch.randn(6, d, generator=gen, dtype=torch.float64) for _ in range(2)]
    em = torch.randn(n, d, generator=gen, dtype=torch.float64)
    es = em.clone()
    es[:, 0] = 0  # the safe rows drop direction 0 (the "concept")
    x = torch.randn(200, d, generator=gen, dtype=torch.float64)
    x[:, 0] *= 0.05
    cov = x.T @ x / len(x)

    def solve(a, b):
        return solve_transform(a, b, cov, 0.1, 1e-4)

    t0, _ = solve(em, es)
    gram = sum(w.T @ w for w in ws)
    adv = closed_form_adversaries(gram, t0, em, 0.1)

    class Cfg:
        robust, robust_attack, robust_reg = 1, "closed-form", 0.1

    t1, info = harden(None, pairs=[], em=em, es=es, row_pair=torch.arange(n), cov=cov, t=t0, solve=solve,
                      make_edit=None, config=Cfg, paths=[], seed=0, progress=False, gram=gram)
    before = torch.linalg.norm(adv @ t0.T - es)
    after = torch.linalg.norm(adv @ t1.T - es)
    assert after < 0.9 * before, (float(before), float(after))
    assert info["rounds"][0]["closed_form"]["rows"] == n
    assert torch.linalg.norm(em @ t1.T - es) < 0.5 * torch.linalg.norm(em - es)


def test_hardening_rounds_add_rows_and_re_solve(tiny_pipe, tmp_path):
    plain = trce.erase(tiny_pipe, "shapeworld-red", stages="T", cache=tmp_path, progress=False)
    hard = trce.erase(tiny_pipe, "shapeworld-red", stages="T", cache=tmp_path, progress=False, robust=2,
                      T={"robust_attack": "closed-form"})
    rounds = hard.info["robust"]["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    n = plain.info["embeddings"]
    assert rounds[0]["embeddings"] == 2 * n and rounds[1]["embeddings"] == 3 * n
    assert hard.settings["robust"]["robust"] == 2 and hard.info["embeddings"] == n
    assert set(hard.weights) == set(plain.weights)
    assert any(not torch.equal(hard.weights[k], plain.weights[k]) for k in plain.weights)


def test_soft_adversaries_run_on_the_edited_model(tiny_pipe, tmp_path):
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    edit = trce.erase(tiny_pipe, "shapeworld-red", stages="T", cache=tmp_path, progress=False, robust=1,
                      T={"robust_attack": "soft", "robust_prompts": 2, "robust_steps": 2, "robust_samples": 2,
                         "robust_reference_steps": 2})
    (record,) = edit.info["robust"]["rounds"]
    assert record["soft"]["rows"] == 2 and "closed_form" not in record
    assert all(torch.equal(tiny_pipe.unet.state_dict()[k], v) for k, v in before.items())  # left as it was


def test_rece_and_robust_from_the_cli(tiny_dir, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("TRCE_CACHE", str(tmp_path / "cache"))
    code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--method", "rece",
                             "--out", tmp_path / "rece")
    assert code == 0, err
    meta = json.loads((tmp_path / "rece" / "patch.json").read_text())
    assert meta["method"] == "rece" and len(meta["info"]["robust"]["rounds"]) == 3  # RECE's --epochs 3
    assert meta["settings"]["robust"] == 3 and meta["settings"]["reg"] == 0.1  # absolute λ (scripts/nudity.sh)
    code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--stages", "T",
                           "--robust", "1", "--set", "T.robust_attack=closed-form", "--out", tmp_path / "hard")
    assert code == 0, err
    meta = json.loads((tmp_path / "hard" / "patch.json").read_text())
    assert meta["settings"]["robust"]["robust"] == 1
    code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--robust", "1",
                           "--set", "T.robust_attack=closed", "--out", tmp_path / "bad")
    assert_one_line_error(code, err, "unknown robust_attack 'closed'")
    code, _, err = run_cli("erase", "--model", tiny_dir, "--concept", "shapeworld-red", "--method", "kpop",
                           "--robust", "1", "--out", tmp_path / "bad2")
    assert_one_line_error(code, err, "--robust is a setting of stage T")


def test_bad_settings_name_the_value():
    with pytest.raises(TrceError, match="robust must be an integer >= 0, got -1"):
        StageTConfig(robust=-1)
    with pytest.raises(TrceError, match="did you mean 'soft'"):
        StageTConfig(robust_attack="sof")
    assert layer_gram is not None
