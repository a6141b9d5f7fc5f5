"""The denoiser D(x, σ): a raw network made into an x0-estimator by a ``DenoiserScaling``."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from videolavit.diffusion.denoiser_scaling import DenoiserScaling


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] with ``ndim`` dims, so one value per sample broadcasts over the rest."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def sigma_per_sample(sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] σ as a [B] tensor on x's device (one σ per sample, all frames alike).

    σ is float64 if given so or if x is float64, otherwise float32: the coefficients at σ = 700 lose
    too much in half precision.
    """
    sigma = torch.as_tensor(sigma, device=x.device)
    dtype = torch.float64 if torch.float64 in (sigma.dtype, x.dtype) else torch.float32
    sigma = sigma.to(dtype)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or of shape [{x.shape[0]}], got {tuple(sigma.shape)}")
    return sigma


class Denoiser(nn.Module):
    """D(x, σ) = c_skip·x + c_out·net(c_in·x, c_noise, **cond).

    ``net`` gets the scaled noisy input with x's layout ([B, T, C, H, W] for video, [B, C, H, W]
    for images) and c_noise [B]; anything concatenated to the input (the keyframe latent, the motion
    field) is the network's business and arrives through ``cond``, unscaled. If ``net`` is an
    ``nn.Module`` it is registered, so the denoiser's parameters are the network's.
    """

    def __init__(self, net: Callable[..., torch.Tensor], scaling: DenoiserScaling):
        super().__init__()
        self.net = net
        self.scaling = scaling

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor, **cond) -> torch.Tensor:
        sigma = sigma_per_sample(sigma, x)  # [B]
        c_skip, c_out, c_in, c_noise = self.scaling(sigma)
        c_skip, c_out, c_in = (append_dims(c, x.ndim) for c in (c_skip, c_out, c_in))
        return c_skip * x + c_out * self.net(c_in * x, c_noise, **cond)
