import pytest


@pytest.mark.slow
def test_shipped_shapeworld_meets_its_quality_bar():
    """The bar of `trce shapeworld check` on the shipped weights (600 images, DDIM 30, guidance 7.5)."""
    from trce.loading import load_pipeline
    from trce.shapeworld.check import format_table, run_check

    result = run_check(load_pipeline("shapeworld", device="cpu"), n=600, progress=False)
    assert result["passed"], format_table(result)


def test_shipped_detector_reads_renders():
    """The shipped attribute classifier agrees with fresh renders (held-out seeds)."""
    import numpy as np

    from trce.shapeworld import detector, world
    from trce.shapeworld.check import classify

    rng = np.random.default_rng(2024)
    scenes = [world.sample_scene(rng) for _ in range(64)]
    pred = classify(np.stack([world.render(s) for s in scenes]), detector())
    for attribute in world.ATTRIBUTES:
        acc = np.mean([p == s.attribute(attribute) for p, s in zip(pred[attribute], scenes)])
        assert acc >= 0.97, (attribute, acc)
