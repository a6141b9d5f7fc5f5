"""Deterministic DDIM (η = 0) in σ-space, its inversion, and the long-video keyframe start.

In σ-space (x = x0 + σ·ε) a DDIM step is x' = D + σ'·(x − D)/σ: the Euler step of the probability
flow ODE. A discrete-time (DDPM ᾱ_t) schedule is the same thing after x_VE = x_VP·√(1 + σ_t²) with
σ_t = √((1 − ᾱ_t)/ᾱ_t) (``sigmas_from_alphas_cumprod``; the network side is
``DiscreteTimeScaling``). All functions take ``sigmas`` descending, ending at the target level
(0 for a full clean sample), exactly as the samplers use them.

Long video (paper eq. 4; release ``regenerate_noise``): the next clip's keyframe does not start from
pure noise but from the previous clip's last frame, brought to the noise level of step k of the
schedule and denoised over the remaining steps. The paper inverts it with DDIM over those steps;
the release simply adds noise at k = int(0.85·N). ``next_keyframe_start`` offers both.
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple

import torch

from videolavit.diffusion.denoiser import sigma_per_sample

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [B, ...], σ [B]) -> D [B, ...]


class ScheduleStart(NamedTuple):
    """Where to start sampling part-way: latents at sigmas[0] and the schedule to run from there."""

    x: torch.Tensor
    sigmas: torch.Tensor  # [K + 1], descending tail of the full schedule


def _denoise(denoise: DenoiseFn, x: torch.Tensor, sigma: float) -> torch.Tensor:
    return denoise(x, sigma_per_sample(sigma, x))


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """DDPM timesteps (descending, e.g. a diffusers ``DDIMScheduler.timesteps``) -> σ schedule [len + 1].

    The trailing 0 is DDIM's final step to ᾱ = 1 (diffusers' ``set_alpha_to_one=True``).
    """
    alphas = torch.as_tensor(alphas_cumprod, dtype=torch.float64)[torch.as_tensor(timesteps).long().cpu()]
    sigmas = ((1 - alphas) / alphas).sqrt()
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def ddim_step(denoise: DenoiseFn, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """x at σ -> x at σ_next (either direction): keep D(x, σ), rescale the implied noise to σ_next."""
    denoised = _denoise(denoise, x, sigma)
    return denoised + (sigma_next / sigma) * (x - denoised)


def ddim_sample(x: torch.Tensor, denoise: DenoiseFn, sigmas: torch.Tensor) -> torch.Tensor:
    """x at sigmas[0] -> x at sigmas[-1], deterministically (η = 0)."""
    sigmas = [float(s) for s in sigmas]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = ddim_step(denoise, x, sigma, sigma_next)
    return x


def ddim_invert(x0: torch.Tensor, denoise: DenoiseFn, sigmas: torch.Tensor, *,
                fixed_point_iters: int = 0) -> torch.Tensor:
    """x at sigmas[-1] (usually clean, σ = 0) -> x at sigmas[0]: the latents ``ddim_sample`` maps back to x0.

    Each upward step σ_lo -> σ_hi solves the sampling step's equation x_lo = x_hi − (σ_hi − σ_lo)·ε̂(x_hi)
    with ε̂(x) = (x − D(x, σ_hi))/σ_hi. Classic DDIM inversion (``fixed_point_iters=0``) uses ε̂(x_lo),
    i.e. the denoiser at the target level on the current latents, which works from σ = 0 but is only
    first-order accurate: the round trip drifts unless steps are small. Each fixed-point iteration
    re-evaluates ε̂ at the current x_hi estimate, making the round trip exact in the limit.
    """
    sigmas = [float(s) for s in sigmas]
    x = x0
    for sigma_hi, sigma_lo in zip(reversed(sigmas[:-1]), reversed(sigmas[1:])):
        x_hi = x
        for _ in range(1 + fixed_point_iters):
            eps = (x_hi - _denoise(denoise, x_hi, sigma_hi)) / sigma_hi
            x_hi = x + (sigma_hi - sigma_lo) * eps
        x = x_hi
    return x


def start_index(fraction: float, sigmas: torch.Tensor) -> int:
    """The step at which ``fraction`` of the schedule's N steps is done: int(fraction·N), as the release."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    return int(fraction * (len(sigmas) - 1))


def noise_to_fraction(x: torch.Tensor, fraction: float, sigmas: torch.Tensor,
                      generator: torch.Generator | None = None) -> ScheduleStart:
    """Clean x -> x + σ_k·ε at k = int(fraction·N), with the remaining schedule sigmas[k:].

    The release's cheap long-video start (``inverse_rate=0.85``): one draw of noise, no network call.
    """
    k = start_index(fraction, sigmas)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return ScheduleStart(x + float(sigmas[k]) * noise, sigmas[k:])


def invert_to_fraction(x: torch.Tensor, fraction: float, sigmas: torch.Tensor, denoise: DenoiseFn, *,
                       fixed_point_iters: int = 0) -> ScheduleStart:
    """Clean x -> DDIM-inverted latents at σ_k, k = int(fraction·N): the paper's ΔT = N − k inversion steps."""
    k = start_index(fraction, sigmas)
    tail = sigmas[k:]
    return ScheduleStart(ddim_invert(x, denoise, tail, fixed_point_iters=fixed_point_iters), tail)


def next_keyframe_start(last_frame: torch.Tensor, sigmas: torch.Tensor, *,
                        strategy: Literal["noise", "invert"] = "noise", fraction: float = 0.85,
                        denoise: DenoiseFn | None = None, generator: torch.Generator | None = None,
                        fixed_point_iters: int = 0) -> ScheduleStart:
    """Starting latents of the next clip's keyframe from the previous clip's last frame (paper eq. 4).

    last_frame: the last generated frame encoded in the keyframe model's latent space, [B, C, H, W].
    ``strategy="noise"`` is the release (``noise_to_fraction``); ``"invert"`` is the paper's DDIM
    inversion with ``denoise`` (``invert_to_fraction``). Sample the keyframe from the returned x over
    the returned sigmas.
    """
    if strategy == "noise":
        return noise_to_fraction(last_frame, fraction, sigmas, generator)
    if strategy == "invert":
        if denoise is None:
            raise ValueError("strategy='invert' needs the keyframe denoiser")
        return invert_to_fraction(last_frame, fraction, sigmas, denoise, fixed_point_iters=fixed_point_iters)
    raise ValueError(f"unknown strategy {strategy!r}; expected 'noise' or 'invert'")
