"""Caches cannot poison results: a truncated, corrupted or foreign cache file is reported, rebuilt and never used."""

from __future__ import annotations

import logging

import torch

from trce.methods.prior import preservation_prior
from trce.methods.trajectories import Reference, concept_trajectories
from trce.utils import cachefile

PROMPTS = ["a red circle", "a blue star on a black background", "a green square"]
PAIRS = [("a red circle", "a circle"), ("a crimson star", "a star")]


def _one(folder, pattern):
    files = sorted(folder.rglob(pattern))
    assert len(files) == 1, files
    return files[0]


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_prior_cache_is_rebuilt_never_used(tiny_pipe, tmp_path, caplog):
    first = preservation_prior(tiny_pipe, PROMPTS, "all", cache=tmp_path, progress=False)
    assert not first.cached
    path = _one(tmp_path, "*.safetensors")
    assert preservation_prior(tiny_pipe, PROMPTS, "all", cache=tmp_path, progress=False).cached
    for damage in (_flip_last_byte, lambda p: p.write_bytes(p.read_bytes()[:50])):  # a flipped bit, a truncation
        damage(path)
        with caplog.at_level(logging.WARNING):
            again = preservation_prior(tiny_pipe, PROMPTS, "all", cache=tmp_path, progress=False)
        assert not again.cached and torch.equal(again.cov, first.cov)
        assert "rebuilding it" in caplog.text
        caplog.clear()
    assert preservation_prior(tiny_pipe, PROMPTS, "all", cache=tmp_path, progress=False).cached  # rewritten whole


def test_a_cache_file_for_another_key_is_never_used(tmp_path, caplog):
    path = tmp_path / "x.safetensors"
    cachefile.save(path, {"a": torch.ones(3)}, {"model": "m1"})
    assert cachefile.load(path, {"model": "m1"}, "test") is not None
    with caplog.at_level(logging.WARNING):
        assert cachefile.load(path, {"model": "m2"}, "test") is None
    assert "other settings or another base model" in caplog.text and not path.exists()


def test_an_unwritable_cache_is_skipped_with_one_line(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        assert cachefile.save(blocker / "sub" / "x.safetensors", {"a": torch.ones(1)}, {}) is False
    assert "carrying on without it" in caplog.text


def test_a_damaged_trajectory_cache_is_rebuilt_to_the_same_values(tiny_pipe, tmp_path, caplog):
    ref = Reference.from_pipe(tiny_pipe)
    args = {"steps": 2, "keep": 1, "guidance": 3.0, "beta": 2.0, "image_size": None, "seed": 0, "batch_size": 2,
            "cache_dir": tmp_path, "progress": False}
    first = concept_trajectories(ref, PAIRS, 3, **args)
    path = _one(tmp_path, "concept-*.safetensors")
    _flip_last_byte(path)
    with caplog.at_level(logging.WARNING):
        again = concept_trajectories(ref, PAIRS, 3, **args)
    assert "corrupt (checksum mismatch): rebuilding it" in caplog.text
    assert torch.equal(first.f_safe, again.f_safe) and torch.equal(first.latents, again.latents)
