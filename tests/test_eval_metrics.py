"""Metrics by their properties: Wilson intervals, the Fréchet distance, CLIP score, ESR/PSR."""

import numpy as np
import pytest
import torch

from trce.eval import metrics as M


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (1, 931), (500, 1000)])
def test_wilson_interval_properties(k, n):
    lo, hi = M.wilson(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert lo < hi
    # symmetric under k -> n - k
    lo2, hi2 = M.wilson(n - k, n)
    assert lo2 == pytest.approx(1 - hi) and hi2 == pytest.approx(1 - lo)


def test_wilson_narrows_with_n_and_covers():
    widths = [np.diff(M.wilson(n // 4, n))[0] for n in (20, 200, 2000)]
    assert widths[0] > widths[1] > widths[2]
    # coverage of the true rate over many binomial draws is close to 95%
    rng = np.random.default_rng(0)
    p, n = 0.1, 150
    hits = [M.wilson(k, n)[0] <= p <= M.wilson(k, n)[1] for k in rng.binomial(n, p, size=2000)]
    assert 0.92 <= np.mean(hits) <= 0.98
    assert M.wilson(0, 0) == [0.0, 1.0]
    with pytest.raises(ValueError):
        M.wilson(5, 3)


def test_rate_and_esr_psr():
    r = M.rate([True, False, False, True])
    assert r["n"] == 4 and r["asr"] == 0.5 and r["asr_ci"] == M.wilson(2, 4)
    assert M.rate([])["asr"] is None
    named = ["circle", "star", "circle", "square", "cross", "square"]
    predicted = ["circle", "square", "diamond", "square", "circle", "square"]
    out = M.esr_psr(named, predicted, ["circle", "star"])
    assert out["esr_n"] == 3 and out["esr"] == pytest.approx(2 / 3)  # star->square, circle->diamond erased
    assert out["psr_n"] == 3 and out["psr"] == pytest.approx(2 / 3)  # cross drawn as circle is a failure
    assert out["esr_ci"] == M.wilson(2, 3)


def test_frechet_closed_form_diagonal_gaussians():
    rng = np.random.default_rng(1)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.2, 3.0, size=d), rng.uniform(0.2, 3.0, size=d)
    # for commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert M.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_properties():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(400, 5))
    b = rng.normal(size=(400, 5)) @ rng.normal(size=(5, 5)) + 1.0
    mu, sigma = M.feature_stats(a)
    assert M.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    assert M.frechet_from_features(a, b) == pytest.approx(M.frechet_from_features(b, a), rel=1e-6)
    # a pure translation by t adds |t|^2
    t = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert M.frechet_from_features(a, a + t) == pytest.approx(t @ t, rel=1e-6)
    # one-dimensional Gaussians: (m1 - m2)^2 + (s1 - s2)^2
    assert M.frechet_distance(np.array([0.0]), np.array([[4.0]]), np.array([1.0]), np.array([[1.0]])) == pytest.approx(2.0)
    # fewer samples than dimensions still gives a finite, non-negative number
    assert np.isfinite(M.frechet_from_features(a[:3], b[:3]))


def test_clip_score_properties():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 8))
    assert np.allclose(M.clip_score(x, x), 100.0)
    assert np.allclose(M.clip_score(x, -x), 0.0)  # clamped at zero, as torchmetrics does
    assert np.allclose(M.clip_score(x, 3 * x), 100.0)  # scale-free
    s = M.clip_score(x, rng.normal(size=(5, 8)))
    assert s.shape == (5,) and ((0 <= s) & (s <= 100)).all()


def test_shapeworld_embeddings_shapes():
    from trce.shapeworld import world

    rng = np.random.default_rng(0)
    images = np.stack([world.render(world.sample_scene(rng)) for _ in range(3)])
    img = M.shapeworld_image_embeds(images)
    txt = M.shapeworld_text_embeds(["a red star on a black background", "a blue circle", "a striped square"])
    assert img.shape == txt.shape == (3, img.shape[1])
    assert np.isfinite(M.clip_score(img, txt)).all()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script: the stand-in only
def test_inception_fid_plumbing(tmp_path):
    """FID uses a TorchScript Inception with StyleGAN/clean-fid's call signature; a stand-in checks the plumbing."""

    class Stub(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return x.float().mean(dim=(2, 3))  # (B, 3) "features"

    path = tmp_path / "inception.pt"
    torch.jit.script(Stub()).save(str(path))
    inc = M.Inception(path)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, size=(6, 16, 16, 3), dtype=np.uint8)
    feats = inc.features(imgs)
    assert feats.shape == (6, 3) and np.isfinite(M.frechet_from_features(feats, feats + 1))
    with pytest.raises(M.TrceError, match="does not exist"):
        M.Inception(tmp_path / "missing.pt")
