"""The EDM training objective: weighted x0-MSE of a denoiser at log-normally sampled noise levels.

Preconditioning lives in ``denoiser_scaling``, σ sampling in ``sigma_sampling``, λ(σ) in
``loss_weighting``; this module only composes them for one batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from videolavit.diffusion.denoiser import Denoiser, append_dims
from videolavit.diffusion.loss_weighting import LossWeighting, weighting_for
from videolavit.diffusion.sigma_sampling import LogNormalSigmaSampler, SigmaSampler


class DiffusionLossTerms(NamedTuple):
    loss: torch.Tensor  # [] mean of per_sample
    per_sample: torch.Tensor  # [B] λ(σ)·mean‖D − x0‖² per sample (for σ-binned logging)
    sigma: torch.Tensor  # [B]


class DiffusionLoss:
    """λ(σ)·‖D(x0 + σ·n, σ) − x0‖², σ ~ ``sigma_sampler`` per sample and shared by all its frames.

    ``loss_weighting=None`` takes the weighting matched to the denoiser's scaling (λ = 1/c_out²),
    which is the consistent choice; pass one to override.
    """

    def __init__(self, sigma_sampler: SigmaSampler | None = None,
                 loss_weighting: LossWeighting | None = None):
        self.sigma_sampler = sigma_sampler or LogNormalSigmaSampler()
        self.loss_weighting = loss_weighting

    def terms(self, denoiser: Denoiser, x0: torch.Tensor, cond: dict | None = None, *,
              generator: torch.Generator | None = None) -> DiffusionLossTerms:
        """x0: clean latents [B, T, C, H, W] or [B, C, H, W]; cond: keyword conditioning of the net."""
        sigma = self.sigma_sampler(x0.shape[0], generator=generator, device=x0.device)  # [B]
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_noisy = x0 + append_dims(sigma, x0.ndim) * noise
        denoised = denoiser(x_noisy, sigma, **(cond or {}))
        weighting = self.loss_weighting or weighting_for(denoiser.scaling)
        mse = ((denoised.float() - x0.float()) ** 2).flatten(1).mean(dim=1)  # [B]
        per_sample = weighting(sigma) * mse
        return DiffusionLossTerms(per_sample.mean(), per_sample, sigma)

    def __call__(self, denoiser: Denoiser, x0: torch.Tensor, cond: dict | None = None, *,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return self.terms(denoiser, x0, cond, generator=generator).loss
