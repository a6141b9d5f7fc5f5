"""Fréchet distance from streamed float64 sums: agreement with NumPy/SciPy, FD(X, X) = 0, saved real
statistics, and frame FID with a TorchScript feature extractor."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import Tensor, nn

from videolavit.metrics.fid import FrameFID
from videolavit.metrics.frechet import FrechetDistance, frechet_distance, gaussian_from_sums
from videolavit.metrics.weights import MissingWeightsError


def scipy_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook formula (pytorch-fid / StyleGAN-V): np.cov and scipy.linalg.sqrtm of the product."""
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def correlated(rng: np.random.Generator, n: int, d: int, shift: float) -> np.ndarray:
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + shift * rng.normal(size=d)


def stream(metric: FrechetDistance, x: np.ndarray, real: bool, sizes=(7, 1, 30)) -> None:
    """Feed x in uneven batches, so the sums really accumulate across updates."""
    start, i = 0, 0
    while start < len(x):
        size = sizes[i % len(sizes)]
        metric.update(torch.from_numpy(x[start:start + size]).float(), real=real)
        start, i = start + size, i + 1


def test_streamed_distance_matches_scipy_reference():
    rng = np.random.default_rng(0)
    d = 12
    real = correlated(rng, 300, d, 0.0).astype(np.float32)
    fake = correlated(rng, 250, d, 0.5).astype(np.float32)
    metric = FrechetDistance(num_features=d)
    stream(metric, real, real=True)
    stream(metric, fake, real=False)
    value = metric.compute()
    reference = scipy_frechet(real.astype(np.float64), fake.astype(np.float64))
    assert value.dtype == torch.float64
    assert reference > 0.5  # a non-trivial distance, so the relative check means something
    assert float(value) == pytest.approx(reference, rel=1e-6)


def test_gaussian_from_sums_is_unbiased_covariance():
    x = np.random.default_rng(1).normal(size=(40, 5))
    t = torch.from_numpy(x)
    stats = gaussian_from_sums(t.sum(0), t.T @ t, len(x))
    np.testing.assert_allclose(stats.mu.numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma.numpy(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_distance_of_a_set_to_itself_is_zero_even_when_covariance_is_singular():
    rng = np.random.default_rng(2)
    for n, d in ((500, 16), (6, 32)):  # n < d: singular covariance, where sqrtm struggles
        x = correlated(rng, n, d, 3.0) * 10.0
        metric = FrechetDistance(num_features=d)
        stream(metric, x, real=True)
        stream(metric, x, real=False)
        value = float(metric.compute())
        scale = float(np.trace(np.cov(x, rowvar=False)))
        assert abs(value) <= 1e-6 * scale, (n, d, value, scale)


def test_distance_between_known_gaussians():
    # Diagonal covariances: FD = |Δmu|² + Σ (√a − √b)².
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 4.0, 1.0])
    value = frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    expected = ((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()
    assert float(value) == pytest.approx(float(expected), rel=1e-12)


def test_saved_real_statistics_reproduce_the_streamed_value(tmp_path):
    rng = np.random.default_rng(3)
    real, fake = correlated(rng, 80, 6, 0.0), correlated(rng, 70, 6, 1.0)
    first = FrechetDistance(num_features=6)
    stream(first, real, real=True)
    stream(first, fake, real=False)
    path = first.save_real_statistics(tmp_path / "real_stats.npz")

    second = FrechetDistance(num_features=6, real_statistics_path=path)
    stream(second, fake, real=False)
    assert float(second.compute()) == pytest.approx(float(first.compute()), rel=1e-12)
    assert second.real_statistics().n == 80
    with pytest.raises(RuntimeError, match="real statistics were loaded"):
        second.update(torch.zeros(2, 6), real=True)
    second.reset()  # loaded statistics survive resets: they are not summed states
    stream(second, fake, real=False)
    assert float(second.compute()) == pytest.approx(float(first.compute()), rel=1e-12)


def test_statistics_from_another_extractor_are_refused(tmp_path):
    class Other(FrechetDistance):
        def fingerprint(self) -> str:
            return "some-other-network"

    metric = Other(num_features=3)
    metric.update(torch.randn(5, 3), real=True)
    path = metric.save_real_statistics(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="some-other-network"):
        FrechetDistance(num_features=3, real_statistics_path=path)


def test_reset_can_keep_real_sums():
    rng = np.random.default_rng(4)
    real, fake1, fake2 = (correlated(rng, 50, 4, s) for s in (0.0, 1.0, 2.0))
    keep = FrechetDistance(num_features=4, reset_real_features=False)
    stream(keep, real, real=True)
    stream(keep, fake1, real=False)
    keep.compute()
    keep.reset()
    stream(keep, fake2, real=False)
    assert float(keep.compute()) == pytest.approx(scipy_frechet(real, fake2), rel=1e-6)

    drop = FrechetDistance(num_features=4)
    stream(drop, real, real=True)
    drop.reset()
    stream(drop, fake2, real=False)
    with pytest.raises(ValueError, match="at least 2 real samples"):
        drop.compute()


class PoolFeatures(nn.Module):
    """Stands in for StyleGAN's Inception TorchScript: uint8 images in, features out on request."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 5)

    def forward(self, img: Tensor, return_features: bool = False) -> Tensor:
        pooled = img.float().mean(dim=(2, 3)) / 255.0  # [N, 3]
        features = self.proj(pooled)
        return features if return_features else features.softmax(dim=1)


def test_frame_fid_with_torchscript_extractor(tmp_path):
    torch.manual_seed(0)
    extractor = torch.jit.script(PoolFeatures())
    path = tmp_path / "inception.pt"
    extractor.save(str(path))
    fid = FrameFID(path, kind="auto")
    assert fid.num_features == 5  # found by a dummy forward

    videos = torch.rand(3, 4, 3, 10, 12) * 2 - 1  # [B, T, 3, H, W]
    features = fid.extract_features(videos)
    uint8 = ((videos.flatten(0, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    torch.testing.assert_close(features, extractor(uint8, return_features=True))

    fid.update(videos, real=True)
    fid.update(videos, real=False)
    assert abs(float(fid.compute())) < 1e-9
    other = torch.rand(3, 4, 3, 10, 12) * 2 - 1
    fid.reset()
    fid.update(videos, real=True)
    fid.update(other, real=False)
    expected = scipy_frechet(features.double().numpy(), fid.extract_features(other).double().numpy())
    assert float(fid.compute()) == pytest.approx(expected, rel=1e-6)


def test_frame_fid_missing_extractor_names_the_argument(tmp_path):
    with pytest.raises(MissingWeightsError, match="feature_extractor_path"):
        FrameFID(tmp_path / "absent.pt")
    with pytest.raises(MissingWeightsError, match="feature_extractor_path"):
        FrameFID(None)
