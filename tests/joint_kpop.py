"""KPOP's hidden prompt on a joint-attention family (SD3, FLUX), end to end through the CLI: shared by test_sd3 and
test_flux, which differ only in the pipeline and the hidden prompt's shape."""

from __future__ import annotations

import json

import pytest
import torch

import trce
from trce.edit import load_patch
from trce.errors import TrceError
from trce.families import family_of
from trce.families.injection import PromptInjectionProcessor
from trce.generate import GenSettings, generate
from trce.prompt_injection import hidden_prompt_installed


def kpop_erase_on_the_cli(model_dir, tmp_path, run_cli):
    """`trce erase --method kpop` with tiny settings; returns (pipe, family, edit, patch folder)."""
    patch = tmp_path / "kpop"
    code, _, err = run_cli("erase", "--model", model_dir, "--concept", "shapeworld-red", "--method", "kpop",
                           *[a for s in ("iterations=2", "ddim_steps=2", "latents=cached", "cache_trajectories=1",
                                         "prompt_size=1", "max_prompts=2") for a in ("--set", f"kpop.{s}")],
                           "--out", patch)
    assert code == 0, err
    pipe = trce.load_pipeline(model_dir)
    return pipe, family_of(pipe), load_patch(patch), patch


def check_hidden_prompt_eval_and_install(model_dir, tmp_path, run_cli, pipe, fam, patch, rows: int):
    """`trce eval` with and without the hidden prompt, then `hidden_prompt_installed`: the prompt changes the images
    of the edited model, the processors come back as they were, and a prompt of the wrong width is refused."""
    width = fam.injection_width(pipe)
    runs = {}
    for name, extra in (("plain", []), ("hidden", ["--with-hidden-prompt"])):
        runs[name] = tmp_path / f"eval-{name}"
        code, _, err = run_cli("eval", "--model", model_dir, "--patch", patch, *extra, "--suite", "shapeworld-red",
                               "--limit", 1, "--steps", 2, "--no-progress", "--out", runs[name])
        assert code == 0, err
    metrics = {k: json.loads((v / "metrics.json").read_text()) for k, v in runs.items()}
    assert metrics["hidden"]["hidden_prompt"] is True and "hidden_prompt" not in metrics["plain"]
    assert metrics["hidden"]["n"] == metrics["plain"]["n"] == 9
    edit = load_patch(patch)
    settings, prompts, seeds = GenSettings(steps=2, guidance=5.0, batch_size=2), ["a red circle", "a red star"], [0, 1]
    with edit.applied(pipe):
        erased = generate(pipe, prompts, seeds, settings, progress=False)
        # as drawing left them (SD3 without T5 puts its collapsing processor in place of diffusers' own)
        original = dict(pipe.transformer.attn_processors)
        with hidden_prompt_installed(pipe, edit):
            recovered = generate(pipe, prompts, seeds, settings, progress=False)
        assert (generate(pipe, prompts, seeds, settings, progress=False) == erased).all()
    assert not (recovered == erased).all()  # the hidden prompt acts
    assert all(pipe.transformer.attn_processors[k] is v for k, v in original.items())
    assert not any(isinstance(v, PromptInjectionProcessor) for v in pipe.transformer.attn_processors.values())
    wrong = load_patch(patch)
    wrong.extras["hidden_prompt"] = torch.zeros(rows, fam.text_width(pipe))
    with pytest.raises(TrceError, match=f"prompt width {width}"), hidden_prompt_installed(pipe, wrong):
        pass
