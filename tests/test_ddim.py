"""DDIM (η = 0) sampling and inversion in σ-space, and the long-video keyframe start."""

import pytest
import torch
from diffusers import DDIMScheduler

from videolavit.diffusion.ddim import (
    ddim_invert,
    ddim_sample,
    next_keyframe_start,
    noise_to_fraction,
    sigmas_from_alphas_cumprod,
)
from videolavit.diffusion.denoiser import Denoiser
from videolavit.diffusion.denoiser_scaling import DiscreteTimeScaling, EpsScaling
from videolavit.diffusion.samplers import EulerSampler, KarrasSchedule


def mixture_oracle(x, sigma, means=(-1.0, 1.0), s=0.4):
    """Exact D(x, σ) for x0 ~ ½N(−1, s²) + ½N(1, s²) per element: a nonlinear deterministic denoiser."""
    sig2 = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype) ** 2
    means = torch.tensor(means, dtype=x.dtype)
    logits = -((x[..., None] - means) ** 2) / (2 * (s**2 + sig2[..., None]))
    w = logits.softmax(dim=-1)
    posterior_means = means + (s**2 / (s**2 + sig2[..., None])) * (x[..., None] - means)
    return (w * posterior_means).sum(dim=-1)


def clean_data(n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    return (sign + 0.4 * torch.randn(n, generator=g, dtype=torch.float64)).reshape(n // 4, 4)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_ddim_sample_is_the_euler_sampler_without_churn():
    sigmas = KarrasSchedule()(25).double()
    x = 700.0 * torch.randn(50, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(ddim_sample(x, mixture_oracle, sigmas),
                               EulerSampler()(mixture_oracle, x, sigmas=sigmas), rtol=1e-9, atol=1e-9)


def test_discrete_time_ddim_matches_diffusers_ddim():
    """On a DDPM ᾱ_t schedule our σ-space DDIM is diffusers' DDIMScheduler (η = 0), step for step."""
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=True, steps_offset=1)
    scheduler.set_timesteps(20)
    torch.manual_seed(0)
    weight = torch.randn(4, 4, dtype=torch.float64) * 0.3

    def eps_net(x_vp, t):  # depends on t, so a wrong timestep mapping shows
        return torch.tanh(x_vp @ weight) * (1 + t.to(x_vp.dtype).reshape(-1, 1) / 1000)

    x_vp = torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = x_vp.clone()
    for t in scheduler.timesteps:
        ref = scheduler.step(eps_net(ref, t.reshape(1)), t, ref, eta=0.0).prev_sample

    sigmas = sigmas_from_alphas_cumprod(scheduler.alphas_cumprod, scheduler.timesteps).double()
    denoiser = Denoiser(eps_net, DiscreteTimeScaling(EpsScaling(), scheduler.alphas_cumprod))
    x_ve = x_vp * (1 + sigmas[0] ** 2).sqrt()  # VP latent -> σ-space
    ours = ddim_sample(x_ve, denoiser, sigmas)  # ends at σ = 0, where VP and σ-space agree
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_fixed_point_ddim_inversion_round_trips():
    x0 = clean_data(800)
    sigmas = KarrasSchedule()(25).double()
    x_T = ddim_invert(x0, mixture_oracle, sigmas, fixed_point_iters=10)
    assert x_T.std() > 100  # really at σ_max
    back = ddim_sample(x_T, mixture_oracle, sigmas)
    assert rel_err(back, x0) < 1e-4
    assert (back - x0).abs().max() < 1e-3


def test_classic_ddim_inversion_is_first_order():
    """Plain DDIM inversion drifts with large steps and converges as steps shrink."""
    x0 = clean_data(400)
    errors = []
    for n in (25, 200):
        sigmas = KarrasSchedule()(n).double()
        errors.append(rel_err(ddim_sample(ddim_invert(x0, mixture_oracle, sigmas), mixture_oracle, sigmas), x0))
    assert errors[1] < errors[0] / 4
    assert errors[1] < 0.2


def test_partial_ddim_inversion_round_trips_over_the_release_tail():
    x0 = clean_data()
    sigmas = KarrasSchedule()(25).double()
    start = next_keyframe_start(x0, sigmas, strategy="invert", fraction=0.85, denoise=mixture_oracle)
    assert len(start.sigmas) == 25 - 21 + 1
    torch.testing.assert_close(start.sigmas, sigmas[21:])
    assert rel_err(ddim_sample(start.x, mixture_oracle, start.sigmas), x0) < 2e-3


def test_noise_to_fraction_adds_noise_at_85_percent_of_the_schedule():
    sigmas = KarrasSchedule()(25)
    x = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    start = noise_to_fraction(x, 0.85, sigmas, torch.Generator().manual_seed(1))
    torch.testing.assert_close(start.sigmas, sigmas[21:])  # int(0.85 · 25) = 21
    noise = (start.x - x) / sigmas[21]
    assert noise.mean().item() == pytest.approx(0.0, abs=0.03)
    assert noise.std().item() == pytest.approx(1.0, abs=0.03)

    again = noise_to_fraction(x, 0.85, sigmas, torch.Generator().manual_seed(1))
    other = noise_to_fraction(x, 0.85, sigmas, torch.Generator().manual_seed(2))
    assert torch.equal(start.x, again.x) and not torch.equal(start.x, other.x)
    via_helper = next_keyframe_start(x, sigmas, generator=torch.Generator().manual_seed(1))  # release default
    assert torch.equal(via_helper.x, start.x)

    assert len(noise_to_fraction(x, 0.0, sigmas).sigmas) == 26
    with pytest.raises(ValueError):
        noise_to_fraction(x, 1.0, sigmas)


def test_next_keyframe_start_argument_errors():
    sigmas = KarrasSchedule()(25)
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError):
        next_keyframe_start(x, sigmas, strategy="invert")
    with pytest.raises(ValueError):
        next_keyframe_start(x, sigmas, strategy="renoise")
