"""EDM's deterministic ODE samplers (Euler, Heun; optional churn) on a Karras σ schedule.

A sampler integrates dx/dσ = (x − D(x, σ))/σ from σ_max down to 0 for any ``denoise(x, σ)``
callable (a ``Denoiser`` with its conditioning bound, or a ``GuidedDenoiser``). The release samples
the video U-Net with diffusers' ``EulerDiscreteScheduler`` (Karras σ, v-prediction, 25 steps);
``EulerSampler`` with the defaults here takes the same steps.

Why not diffusers' ``scheduler.step``: its schedulers own the output preconditioning (their
``prediction_type``), while ours lives in ``Denoiser``; EDM samplers need only D. The σ schedule
itself is diffusers' (``EDMEulerScheduler``), which gives exactly the release's sigmas.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Callable

import torch
from diffusers import EDMEulerScheduler

from videolavit.diffusion.denoiser import sigma_per_sample

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B, ...], σ [B]) -> D [B, ...]


class KarrasSchedule:
    """σ_i = (σ_max^(1/ρ) + i/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ for i < N, then σ_N = 0 (EDM eq. 5).

    Defaults are SVD's and the release's (σ_min 0.002, σ_max 700, ρ 7).
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 700.0, rho: float = 7.0):
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.rho = float(rho)

    def __call__(self, num_steps: int, device: torch.device | str | None = None) -> torch.Tensor:
        """[num_steps + 1] float32, descending, last entry 0."""
        scheduler = EDMEulerScheduler(sigma_min=self.sigma_min, sigma_max=self.sigma_max, rho=self.rho,
                                      sigma_schedule="karras", final_sigmas_type="zero")
        scheduler.set_timesteps(num_steps)
        return scheduler.sigmas.to(device=device, dtype=torch.float32)


def initial_latents(shape: tuple[int, ...], sigma_max: float, *, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unit noise times √(σ_max² + 1): the start of sampling, as SVD/diffusers/the release scale it.

    √(σ² + 1) is the variance-preserving unit noise carried into σ-space (x_VE = x_VP·√(1 + σ²)).
    """
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return noise * math.sqrt(sigma_max**2 + 1.0)


class EDMSampler(ABC):
    """Shared loop of EDM Algorithm 2: churn (optional), then one ``step`` per σ interval.

    Churn: for σ_i in [s_tmin, s_tmax], raise σ_i to σ̂ = σ_i·(1 + γ), γ = min(s_churn/N, √2 − 1), by
    adding fresh noise of std s_noise·√(σ̂² − σ_i²). ``s_churn=0`` (default) is the release's
    deterministic sampler. All randomness comes from ``generator``.
    """

    def __init__(self, num_steps: int = 25, schedule: KarrasSchedule | None = None, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0):
        self.num_steps = int(num_steps)
        self.schedule = schedule or KarrasSchedule()
        self.s_churn = float(s_churn)
        self.s_tmin = float(s_tmin)
        self.s_tmax = float(s_tmax)
        self.s_noise = float(s_noise)

    def sigmas(self, device: torch.device | str | None = None) -> torch.Tensor:
        return self.schedule(self.num_steps, device)

    @abstractmethod
    def step(self, denoise: DenoiseFn, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        """x at σ -> x at σ_next (σ_next < σ)."""

    def __call__(self, denoise: DenoiseFn, x: torch.Tensor, *, sigmas: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """x: latents at noise level sigmas[0] (see ``initial_latents``) -> samples at sigmas[-1].

        ``sigmas`` defaults to this sampler's schedule; pass a tail of it to start part-way (long video).
        """
        sigmas = self.sigmas(x.device) if sigmas is None else sigmas
        sigmas = [float(s) for s in sigmas]
        num_intervals = len(sigmas) - 1
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            gamma = 0.0
            if self.s_churn > 0 and self.s_tmin <= sigma <= self.s_tmax:
                gamma = min(self.s_churn / num_intervals, math.sqrt(2.0) - 1.0)
            if gamma > 0:
                sigma_hat = sigma * (1.0 + gamma)
                eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = x + eps * (self.s_noise * math.sqrt(sigma_hat**2 - sigma**2))
                sigma = sigma_hat
            x = self.step(denoise, x, sigma, sigma_next)
        return x

    def generate(self, denoise: DenoiseFn, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Sample from pure noise: ``initial_latents`` at σ_max, then the full schedule."""
        x = initial_latents(shape, self.schedule.sigma_max, generator=generator, device=device, dtype=dtype)
        return self(denoise, x, generator=generator)


def _slope(denoise: DenoiseFn, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """dx/dσ = (x − D(x, σ))/σ of the probability-flow ODE."""
    return (x - denoise(x, sigma_per_sample(sigma, x))) / sigma


class EulerSampler(EDMSampler):
    """First-order steps; one denoiser call per step (the release sampler)."""

    def step(self, denoise: DenoiseFn, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        return x + (sigma_next - sigma) * _slope(denoise, x, sigma)


class HeunSampler(EDMSampler):
    """Second-order (trapezoidal) correction, except on the last step to σ = 0 (EDM Algorithm 1)."""

    def step(self, denoise: DenoiseFn, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        d = _slope(denoise, x, sigma)
        x_euler = x + (sigma_next - sigma) * d
        if sigma_next == 0:
            return x_euler
        d_next = _slope(denoise, x_euler, sigma_next)
        return x + (sigma_next - sigma) * 0.5 * (d + d_next)


class EulerAncestralSampler(EDMSampler):
    """Ancestral Euler (the release's ``EulerAncestralDiscreteScheduler``, η = 1): each step goes down to
    σ_down by an Euler step, then adds fresh noise of std σ_up, σ_down² + σ_up² = σ_next² and
    σ_up = σ_next·√(1 − σ_next²/σ²). One denoiser call and one noise draw (from ``generator``) per step."""

    def step(self, denoise: DenoiseFn, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        raise NotImplementedError("ancestral steps draw noise: call the sampler with its generator")

    def __call__(self, denoise: DenoiseFn, x: torch.Tensor, *, sigmas: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        sigmas = self.sigmas(x.device) if sigmas is None else sigmas
        sigmas = [float(s) for s in sigmas]
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
            sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
            x = x + (sigma_down - sigma) * _slope(denoise, x, sigma)
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + noise * sigma_up
        return x
