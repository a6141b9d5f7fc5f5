"""Denoiser preconditioning: the (c_skip, c_out, c_in, c_noise) coefficients of D(x, σ).

A denoiser is written D(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ)) (Karras et al. 2022,
"EDM", Table 1). The scaling decides what the raw network F predicts and how its input and noise
conditioning are normalised; it must match the checkpoint (SVD and the Video-LaVIT release use
``VScalingWithEDMcNoise``) and the loss weighting must match the scaling (see ``loss_weighting``).

Every scaling maps σ of shape [B] to four tensors of shape [B]; broadcasting over the data dims
is the caller's job (``Denoiser`` does it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

Coefficients = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class DenoiserScaling(ABC):
    """σ [B] -> (c_skip, c_out, c_in, c_noise), each [B]."""

    @abstractmethod
    def __call__(self, sigma: torch.Tensor) -> Coefficients: ...


class EDMScaling(DenoiserScaling):
    """EDM's own preconditioning: F predicts a unit-variance mix of signal and noise.

    c_in·x has unit variance when the data has std ``sigma_data``; c_out is chosen so that the
    effective training target of F has unit variance too (EDM §5).
    """

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = float(sigma_data)

    def __call__(self, sigma: torch.Tensor) -> Coefficients:
        var = sigma**2 + self.sigma_data**2
        c_skip = self.sigma_data**2 / var
        c_out = sigma * self.sigma_data / var.sqrt()
        c_in = 1.0 / var.sqrt()
        c_noise = 0.25 * sigma.log()
        return c_skip, c_out, c_in, c_noise


class VScalingWithEDMcNoise(DenoiserScaling):
    """v-prediction in σ-space with EDM's log-σ noise conditioning: what SVD img2vid was trained with.

    Equals ``EDMScaling(sigma_data=1)`` with the sign of c_out flipped (F predicts v = α·ε − σ̄·x0
    rather than its negative). The release loads SVD-initialised U-Nets, so this is the default for
    the video detokenizer; the name follows Stability's ``sgm`` so configs read the same.
    """

    def __call__(self, sigma: torch.Tensor) -> Coefficients:
        var = sigma**2 + 1.0
        c_skip = 1.0 / var
        c_out = -sigma / var.sqrt()
        c_in = 1.0 / var.sqrt()
        c_noise = 0.25 * sigma.log()
        return c_skip, c_out, c_in, c_noise


class EpsScaling(DenoiserScaling):
    """ε-prediction of a variance-preserving network, seen in σ-space (x_VE = x_VP·√(1+σ²)).

    c_in turns the σ-space input back into the VP input the network was trained on. c_noise is σ
    itself; wrap in ``DiscreteTimeScaling`` for networks conditioned on a DDPM timestep index.
    """

    def __call__(self, sigma: torch.Tensor) -> Coefficients:
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1.0 / (sigma**2 + 1.0).sqrt()
        c_noise = sigma.clone()
        return c_skip, c_out, c_in, c_noise


class VScaling(DenoiserScaling):
    """v-prediction of a variance-preserving network (SD 2.x style); c_noise is σ itself."""

    def __call__(self, sigma: torch.Tensor) -> Coefficients:
        var = sigma**2 + 1.0
        return 1.0 / var, -sigma / var.sqrt(), 1.0 / var.sqrt(), sigma.clone()


class DiscreteTimeScaling(DenoiserScaling):
    """Reuses another scaling's c_skip/c_out/c_in but conditions on the nearest DDPM timestep index.

    Discrete-time networks (e.g. a DDIM-sampled keyframe U-Net) take an integer timestep t, whose
    noise level is σ_t = √((1 − ᾱ_t)/ᾱ_t). σ is mapped to the t with the closest log σ_t.
    """

    def __init__(self, base: DenoiserScaling, alphas_cumprod: torch.Tensor):
        self.base = base
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.log_sigmas = (((1 - alphas_cumprod) / alphas_cumprod).sqrt()).log()  # [num_train_timesteps]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """σ [B] -> nearest timestep index [B] (long)."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        dist = (sigma.double().log()[:, None] - log_sigmas[None, :]).abs()  # [B, num_train_timesteps]
        return dist.argmin(dim=1)

    def __call__(self, sigma: torch.Tensor) -> Coefficients:
        c_skip, c_out, c_in, _ = self.base(sigma)
        return c_skip, c_out, c_in, self.timestep(sigma)
