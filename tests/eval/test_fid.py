"""FID maths against closed forms (torchmetrics' Fréchet distance on features we control), the Inception loading
path from a local weights file, and FID / CLIP score on CLIP features of the tiny CLIP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sd3.eval.clip import Clip, ClipImageFeatures
from sd3.eval.fid import EvalError, feature_fid, inception_fid


class Passthrough(nn.Module):
    """'Images' (N, d) are their own features: the metric then sees exactly the samples we give it."""

    def __init__(self, d: int):
        super().__init__()
        self.num_features = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def with_moments(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    """(n, d) samples whose sample mean is `mean` and unbiased sample covariance is `cov`, exactly (up to fp64)."""
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z -= z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (n - 1))).T  # whitened: sample covariance I
    return mean + z @ torch.linalg.cholesky(cov).T


def fid_of(real: torch.Tensor, fake: torch.Tensor) -> float:
    metric = feature_fid(Passthrough(real.shape[1]))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def test_identical_sets_have_zero_fid():
    x = with_moments(200, torch.zeros(6, dtype=torch.float64), torch.eye(6, dtype=torch.float64) * 2.0, seed=0)
    assert fid_of(x, x.clone()) == pytest.approx(0.0, abs=1e-6)


def test_two_gaussians_give_the_closed_form_frechet_distance():
    """Diagonal covariances: d² = ‖μ1 − μ2‖² + Σ_i (a_i + b_i − 2√(a_i b_i))."""
    d = 5
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.arange(d, dtype=torch.float64) * 0.5
    a, b = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=torch.float64), torch.tensor([4.0, 1.0, 0.5, 0.25, 2.0],
                                                                                      dtype=torch.float64)
    expected = float(((mu1 - mu2) ** 2).sum() + (a + b - 2 * (a * b).sqrt()).sum())
    got = fid_of(with_moments(500, mu1, torch.diag(a), 1), with_moments(500, mu2, torch.diag(b), 2))
    assert got == pytest.approx(expected, rel=1e-6)
    # A full covariance: against scipy's matrix square root of the same formula.
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(3)
    m1, m2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = m1 @ m1.T + np.eye(d), m2 @ m2.T + np.eye(d)
    closed = float(((mu1 - mu2).numpy() ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real))
    got = fid_of(with_moments(400, mu1, torch.from_numpy(s1), 4), with_moments(400, mu2, torch.from_numpy(s2), 5))
    assert got == pytest.approx(closed, rel=1e-5)


def test_inception_fid_refuses_a_missing_weights_file(tmp_path):
    with pytest.raises(EvalError, match="no such file"):
        inception_fid(tmp_path / "pt_inception.pth")


def test_inception_weights_load_from_a_local_file(tmp_path, monkeypatch):
    """Random-initialised weights of torch-fidelity's own Inception class, saved to a file and loaded back through
    inception_fid: the path a real weights file takes, offline. Needs torch-fidelity (hence torchvision)."""
    tf = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    with monkeypatch.context() as patch:  # build once without any weights: no download, no file
        patch.setattr(tf, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(tf.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        random_init = tf.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(random_init.state_dict(), tmp_path / "inception.pth")
    metric = inception_fid(tmp_path / "inception.pth")
    state = metric.inception.state_dict()
    assert all(torch.equal(state[k], v) for k, v in random_init.state_dict().items())
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    metric.update(images, real=True)
    metric.update(images, real=False)
    assert float(metric.compute()) == pytest.approx(0.0, abs=1e-2)


def test_clip_features_fid_and_clip_score_with_the_tiny_clip(tiny_models):
    from PIL import Image

    clip = Clip(tiny_models.root / "metaclip", torch.device("cpu"))
    images = [Image.new("RGB", (48, 32), c) for c in ("red", "blue", "white", "black")]
    captions = ["a red image", "a blue image", "a white image", "a black image"]
    scores = clip.scores(images, captions)
    assert scores.shape == (4,) and torch.all((scores >= 0) & (scores <= 100))
    cos = (clip.image_embeds(images[:1]) @ clip.text_embeds(captions[:1]).T).item()
    assert scores[0].item() == pytest.approx(100 * max(cos, 0.0), rel=1e-5)

    extractor = ClipImageFeatures(clip)
    pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])  # (4, 3, 32, 48)
    assert extractor(pixels).shape == (4, extractor.num_features)
    metric = feature_fid(extractor)
    metric.update(pixels, real=True)
    metric.update(pixels, real=False)
    same = float(metric.compute())
    metric.reset()
    metric.update(pixels, real=True)
    metric.update(255 - pixels, real=False)
    assert same == pytest.approx(0.0, abs=1e-3) and float(metric.compute()) > same
