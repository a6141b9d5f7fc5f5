"""Training-time noise levels: which σ each sample of a batch is trained at.

Continuous-σ networks (EDM, SVD) draw σ log-normally; discrete-time networks (SDXL) draw a DDPM timestep
and train at its σ_t. Both are called the same way, so ``DiffusionLoss`` takes either.
"""

from __future__ import annotations

from typing import Protocol

import torch


class SigmaSampler(Protocol):
    """``sampler(batch_size, generator=..., device=...)`` -> σ [batch_size], float32."""

    def __call__(self, batch_size: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor: ...


class LogNormalSigmaSampler:
    """log σ ~ N(p_mean, p_std²), one σ per sample.

    Defaults are the Video-LaVIT paper's (log σ ~ N(1.0, 1.2²)); EDM uses (−1.2, 1.2) for images
    and SVD (0.7, 1.6) — both are just other ``p_mean``/``p_std`` values.
    """

    def __init__(self, p_mean: float = 1.0, p_std: float = 1.2):
        self.p_mean = float(p_mean)
        self.p_std = float(p_std)

    def __call__(self, batch_size: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """σ [batch_size], float32."""
        log_sigma = torch.randn(batch_size, generator=generator, device=device, dtype=torch.float32)
        return (self.p_mean + self.p_std * log_sigma).exp()


class DiscreteSigmaSampler:
    """σ_t of a uniformly drawn DDPM timestep t, one per sample: how discrete-time U-Nets (SDXL) are trained."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        alphas = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.sigmas = ((1 - alphas) / alphas).sqrt().float()  # [num_train_timesteps]

    def __call__(self, batch_size: int, *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """σ [batch_size], float32."""
        t = torch.randint(0, len(self.sigmas), (batch_size,), generator=generator, device=device)
        return self.sigmas.to(t.device)[t]
