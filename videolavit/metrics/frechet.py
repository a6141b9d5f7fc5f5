"""Fréchet distance between Gaussians fitted to real and generated features (the core of FVD and FID).

Each side keeps only streamed sufficient statistics in float64 — sum x [D], sum x xᵀ [D, D] and n — so
memory does not grow with the number of samples and ranks combine them by summation
(``dist_reduce_fx="sum"``) instead of gathering every feature vector. Real-side statistics depend only
on the data set, so they can be saved once to an ``.npz`` file (mu, sigma, n) and loaded for every
later validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric


@dataclass(frozen=True)
class GaussianStatistics:
    """Mean [D], unbiased covariance [D, D] (float64) and the number of samples they came from."""

    mu: Tensor
    sigma: Tensor
    n: int
    fingerprint: str = ""


def gaussian_from_sums(feature_sum: Tensor, outer_sum: Tensor, n: int | Tensor) -> GaussianStatistics:
    """Mean and unbiased (n - 1) covariance from sum x and sum x xᵀ, as np.cov(rowvar=False) gives."""
    n = int(n)
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {n}")
    mu = feature_sum.double() / n
    sigma = (outer_sum.double() - n * torch.outer(mu, mu)) / (n - 1)
    sigma = 0.5 * (sigma + sigma.T)  # remove round-off asymmetry
    return GaussianStatistics(mu=mu, sigma=sigma, n=n)


def _psd_sqrt(matrix: Tensor) -> Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """‖mu1 − mu2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½ in float64 on the CPU.

    tr (Σ1 Σ2)^½ equals the sum of square roots of the eigenvalues of the symmetric PSD matrix
    Σ1^½ Σ2 Σ1^½ (similar to Σ1 Σ2). Computing it that way is the eigen-based equivalent of
    ``scipy.linalg.sqrtm(Σ1 @ Σ2)`` without its failure modes: no complex parts to discard and no
    blow-up when Σ1 is singular (fewer samples than feature dimensions, as in small validation sets).
    """
    mu1, mu2 = mu1.detach().double().cpu(), mu2.detach().double().cpu()
    sigma1, sigma2 = sigma1.detach().double().cpu(), sigma2.detach().double().cpu()
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature sizes differ: {tuple(mu1.shape)} vs {tuple(mu2.shape)}")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    middle = 0.5 * (middle + middle.T)
    trace_sqrt_product = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return diff.dot(diff) + sigma1.trace() + sigma2.trace() - 2.0 * trace_sqrt_product


def save_gaussian_statistics(path: str | Path, statistics: GaussianStatistics) -> Path:
    """Write mu, sigma, n (and the feature fingerprint) to an ``.npz`` file without pickled objects."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:  # a handle keeps numpy from appending ".npz" to other suffixes
        np.savez(
            handle,
            mu=statistics.mu.double().cpu().numpy(),
            sigma=statistics.sigma.double().cpu().numpy(),
            n=np.asarray(statistics.n, dtype=np.int64),
            fingerprint=np.asarray(statistics.fingerprint),
        )
    return path


def load_gaussian_statistics(path: str | Path, argument: str = "real_statistics_path") -> GaussianStatistics:
    """Read statistics written by :func:`save_gaussian_statistics` (or any npz with mu, sigma, n)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"real statistics file not found at '{path}' (from `{argument}`)")
    with np.load(path, allow_pickle=False) as data:
        missing = {"mu", "sigma", "n"} - set(data.files)
        if missing:
            raise ValueError(f"'{path}' lacks {sorted(missing)}; expected arrays mu, sigma, n")
        fingerprint = str(data["fingerprint"]) if "fingerprint" in data.files else ""
        return GaussianStatistics(
            mu=torch.from_numpy(np.array(data["mu"], dtype=np.float64)),
            sigma=torch.from_numpy(np.array(data["sigma"], dtype=np.float64)),
            n=int(data["n"]),
            fingerprint=fingerprint,
        )


class FrechetDistance(Metric):
    """Fréchet distance between real and fake feature distributions, from streamed float64 sums.

    ``update(inputs, real)`` turns inputs into features [N, D] with :meth:`extract_features` (identity
    here: the inputs *are* features; FVD and FID override it) and adds them to the real or fake sums.
    ``compute()`` returns the distance as a float64 scalar.

    Args:
        num_features: feature size D.
        real_statistics_path: optional ``.npz`` of precomputed real statistics (see
            :meth:`save_real_statistics`); when given, real samples must not be streamed as well.
        reset_real_features: if False, ``reset()`` keeps the streamed real sums, so real data are
            encoded once per run and only fake sums restart each validation.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    real_sum: Tensor
    real_outer_sum: Tensor
    real_n: Tensor
    fake_sum: Tensor
    fake_outer_sum: Tensor
    fake_n: Tensor

    def __init__(
        self,
        num_features: int,
        real_statistics_path: str | Path | None = None,
        reset_real_features: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        self.num_features = int(num_features)
        self.reset_real_features = reset_real_features
        for side in ("real", "fake"):
            self.add_state(f"{side}_sum", torch.zeros(num_features, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(
                f"{side}_outer_sum", torch.zeros(num_features, num_features, dtype=torch.float64),
                dist_reduce_fx="sum",
            )
            self.add_state(f"{side}_n", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        # Loaded statistics are identical on every rank, so they live outside the summed states.
        self._loaded_real: GaussianStatistics | None = None
        self._loaded_real_path: Path | None = None
        if real_statistics_path is not None:
            self.load_real_statistics(real_statistics_path)

    # -- features ---------------------------------------------------------------------------------
    def extract_features(self, inputs: Tensor) -> Tensor:
        """Map a batch of inputs to features [N, D]; the base metric takes features directly."""
        return inputs

    def fingerprint(self) -> str:
        """Identifies the feature extractor and protocol, so statistics from another one are refused."""
        return f"{type(self).__name__}:D={self.num_features}"

    # -- metric API -------------------------------------------------------------------------------
    def update(self, inputs: Tensor, real: bool) -> None:
        """Add a batch to the real (``real=True``) or generated (``real=False``) side."""
        if real and self._loaded_real is not None:
            raise RuntimeError(
                f"real statistics were loaded from '{self._loaded_real_path}'; streaming real samples too "
                f"would mix two estimates. Stream only fake samples, or drop `real_statistics_path`."
            )
        features = self.extract_features(inputs)
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"expected features [N, {self.num_features}], got {tuple(features.shape)}")
        features = features.detach().to(device=self.real_sum.device, dtype=torch.float64)
        side = "real" if real else "fake"
        setattr(self, f"{side}_sum", getattr(self, f"{side}_sum") + features.sum(dim=0))
        setattr(self, f"{side}_outer_sum", getattr(self, f"{side}_outer_sum") + features.T @ features)
        setattr(self, f"{side}_n", getattr(self, f"{side}_n") + features.shape[0])

    def compute(self) -> Tensor:
        real = self._real_statistics_unsynced()
        fake = self._statistics_unsynced("fake")
        return frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)

    def reset(self) -> None:
        if self.reset_real_features:
            super().reset()
            return
        kept = {name: getattr(self, name) for name in ("real_sum", "real_outer_sum", "real_n")}
        super().reset()
        for name, value in kept.items():
            setattr(self, name, value)

    # -- statistics -------------------------------------------------------------------------------
    def _statistics_unsynced(self, side: str) -> GaussianStatistics:
        n = int(getattr(self, f"{side}_n"))
        if n < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least 2 {side} samples in total (across ranks), got {n}"
            )
        stats = gaussian_from_sums(getattr(self, f"{side}_sum"), getattr(self, f"{side}_outer_sum"), n)
        return GaussianStatistics(stats.mu, stats.sigma, stats.n, self.fingerprint())

    def _real_statistics_unsynced(self) -> GaussianStatistics:
        return self._loaded_real if self._loaded_real is not None else self._statistics_unsynced("real")

    def real_statistics(self) -> GaussianStatistics:
        """Real-side mean/covariance over all ranks (a collective call: every rank must make it)."""
        if self._loaded_real is not None:
            return self._loaded_real
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync):
            return self._statistics_unsynced("real")

    def save_real_statistics(self, path: str | Path) -> Path:
        """Save real statistics over all ranks to ``path`` (.npz); collective, global rank 0 writes."""
        statistics = self.real_statistics()
        is_writer = not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
            torch.distributed.get_rank() == 0
        )
        if is_writer:
            save_gaussian_statistics(path, statistics)
        return Path(path)

    def load_real_statistics(self, path: str | Path) -> None:
        """Use saved real statistics instead of streaming real samples (refused for another extractor)."""
        statistics = load_gaussian_statistics(path)
        expected = self.fingerprint()
        if statistics.fingerprint and statistics.fingerprint != expected:
            raise ValueError(
                f"real statistics in '{path}' were computed with '{statistics.fingerprint}', but this metric "
                f"extracts '{expected}'; recompute them with save_real_statistics()"
            )
        if statistics.mu.shape != (self.num_features,):
            raise ValueError(
                f"real statistics in '{path}' have {statistics.mu.numel()} features, expected {self.num_features}"
            )
        self._loaded_real = GaussianStatistics(statistics.mu, statistics.sigma, statistics.n, expected)
        self._loaded_real_path = Path(path)
