"""`trce shapeworld train --exclude ATTRIBUTE=VALUE`: a UNet that never sees the value (the retrained reference)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from trce.errors import TrceError
from trce.shapeworld import models, world
from trce.shapeworld import train as train_module
from trce.shapeworld.train import TrainConfig, Trainer, train
from trce.shapeworld.train_io import excluded_value
from trce.utils import io


def test_excluded_value_names_the_column_and_the_value():
    assert excluded_value("") is None
    column, value = excluded_value(" color = red ")
    assert world.ATTRIBUTES[column] == "color" and world.vocab().values("color")[value] == "red"
    for bad, message in [("red", "^exclude must look like attribute=value "), ("color=", "attribute=value "),
                         ("color=red,pink", "attribute=value "), ("colour=red", "colour"), ("color=crimson", "crimson")]:
        with pytest.raises(TrceError, match=message) as caught:
            excluded_value(bad)
        assert caught.value.field == "exclude" or "unknown" in str(caught.value)


@pytest.mark.heavy
def test_the_unet_never_draws_an_excluded_image_and_starts_from_scratch(tmp_path, caplog, monkeypatch):
    warm, _ = train(tmp_path / "warm", tiny=True, device="cpu")
    cfg = TrainConfig.tiny()
    cfg.exclude, cfg.device, cfg.warm_start, cfg.unet_steps = "color=red", "cpu", str(tmp_path / "warm"), 6
    trainer = Trainer(tmp_path / "no-red", cfg)
    drawn = []
    real_step_rng = train_module._step_rng

    class Spy:  # the UNet's batch generator, recording the images each batch is drawn from
        def __init__(self, rng):
            self.rng = rng

        def __getattr__(self, name):
            return getattr(self.rng, name)

        def choice(self, a, *args, **kwargs):
            out = self.rng.choice(a, *args, **kwargs)
            if kwargs.get("size") == cfg.unet_batch:
                drawn.append(out)
            return out

    with caplog.at_level(logging.INFO, logger="trce"):
        trainer.run(("pool", "clip", "vae", "detector", "cache"))
        _, labels = trainer._pool()
        red = world.vocab().values("color").index("red")
        keep = trainer.unet_images()
        assert len(keep) and not (labels[keep, 1] == red).any()
        assert set(keep) == set(np.flatnonzero(labels[:, 1] != red))  # every other image stays
        monkeypatch.setattr(train_module, "_step_rng", lambda *a: Spy(real_step_rng(*a)))
        trainer.run(("unet",))
    assert len(drawn) == cfg.unet_steps and all(not (labels[d, 1] == red).any() for d in drawn)
    assert "UNet from scratch" in caplog.text
    # From scratch: the first step moved the seed's initial weights, not the warm run's (which differ from them).
    fresh = models.unet_model(seed=cfg.seed).state_dict()
    warm_unet = io.load_tensors(warm / "unet" / "diffusion_pytorch_model.safetensors")
    name = next(k for k in fresh if k.endswith("conv_in.weight"))
    trained = io.load_tensors(tmp_path / "no-red" / "unet" / "unet.safetensors")[name]
    assert (trained - fresh[name]).abs().max() < (trained - warm_unet[name].float()).abs().max()
    assert io.read_json(tmp_path / "no-red" / "train.json")["config"]["exclude"] == "color=red"


@pytest.mark.heavy
def test_clip_steps_zero_keeps_the_warm_text_encoder(tmp_path):
    warm, _ = train(tmp_path / "warm", tiny=True, device="cpu")
    export, _ = train(tmp_path / "same", tiny=True, device="cpu", warm_start=str(tmp_path / "warm"), clip_steps=0)
    a = io.load_tensors(warm / "text_encoder" / "model.safetensors")
    b = io.load_tensors(export / "text_encoder" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
