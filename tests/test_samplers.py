"""Karras schedule, Euler/Heun samplers and classifier-free guidance."""

import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from videolavit.diffusion.denoiser import Denoiser
from videolavit.diffusion.denoiser_scaling import VScalingWithEDMcNoise
from videolavit.diffusion.guidance import (
    ConstantGuidance,
    GuidedDenoiser,
    LinearFrameGuidance,
    unconditional,
)
from videolavit.diffusion.samplers import EulerSampler, HeunSampler, KarrasSchedule, initial_latents

# diffusers scheduler config of SVD img2vid-xt, which the release loads for its video U-Net.
RELEASE_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", interpolation_type="linear",
    num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002,
    steps_offset=1, timestep_spacing="leading", timestep_type="continuous", use_karras_sigmas=True,
)

MU, S = 0.3, 0.5  # data ~ N(MU, S²) per element


def gaussian_oracle(x, sigma):
    """Exact D(x, σ) = E[x0 | x] for x0 ~ N(MU, S²), x = x0 + σ·n."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return MU + S**2 / (S**2 + s**2) * (x - MU)


# --- schedule ---------------------------------------------------------------------------------------

def test_karras_schedule_endpoints_and_monotonicity():
    sigmas = KarrasSchedule()(25)
    assert sigmas.shape == (26,) and sigmas.dtype == torch.float32
    assert sigmas[0].item() == pytest.approx(700.0)
    assert sigmas[-2].item() == pytest.approx(0.002)
    assert sigmas[-1].item() == 0.0
    assert (sigmas[1:] < sigmas[:-1]).all()


def test_karras_schedule_interior_follows_rho():
    sched = KarrasSchedule(sigma_min=0.01, sigma_max=80.0, rho=3.0)
    sigmas = sched(11).double()
    i, n = 4, 11
    expected = (80.0 ** (1 / 3) + i / (n - 1) * (0.01 ** (1 / 3) - 80.0 ** (1 / 3))) ** 3
    assert sigmas[i].item() == pytest.approx(expected, rel=1e-6)
    assert KarrasSchedule(rho=7.0)(11)[4] != KarrasSchedule(rho=3.0)(11)[4]


def test_karras_schedule_matches_the_release_scheduler():
    release = EulerDiscreteScheduler(**RELEASE_SCHEDULER)
    release.set_timesteps(25)
    torch.testing.assert_close(KarrasSchedule()(25), release.sigmas.float(), rtol=1e-6, atol=0)
    assert math.sqrt(700.0**2 + 1) == pytest.approx(release.init_noise_sigma)


def test_euler_sampler_takes_the_release_steps():
    """Our Denoiser(VScalingWithEDMcNoise) + EulerSampler == the release's EulerDiscreteScheduler loop."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(8, 4, 3, padding=1))

    def v_net(x_in, t):  # [B, T, C, H, W], t [B] -> v
        b, f = x_in.shape[:2]
        return net(x_in.flatten(0, 1)).unflatten(0, (b, f)) * (1 + 0.1 * t.reshape(-1, 1, 1, 1, 1))

    x_start = initial_latents((1, 3, 4, 8, 8), 700.0, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = EulerSampler()(Denoiser(v_net, VScalingWithEDMcNoise()), x_start)

        release = EulerDiscreteScheduler(**RELEASE_SCHEDULER)
        release.set_timesteps(25)
        x = x_start.clone()
        for t in release.timesteps:
            v = v_net(release.scale_model_input(x, t), t.reshape(1))
            x = release.step(v, t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


# --- samplers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler_cls", [EulerSampler, HeunSampler])
def test_sampler_is_deterministic_given_a_seed(sampler_cls):
    sampler = sampler_cls(num_steps=10, s_churn=5.0)
    shape = (2, 3, 4, 4)
    a = sampler.generate(gaussian_oracle, shape, generator=torch.Generator().manual_seed(7))
    b = sampler.generate(gaussian_oracle, shape, generator=torch.Generator().manual_seed(7))
    c = sampler.generate(gaussian_oracle, shape, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2
    # with churn, the generator also drives the sampling noise, not only the start
    x = initial_latents(shape, 700.0, generator=torch.Generator().manual_seed(0))
    d = sampler(gaussian_oracle, x, generator=torch.Generator().manual_seed(1))
    e = sampler(gaussian_oracle, x, generator=torch.Generator().manual_seed(2))
    assert (d - e).abs().max() > 1e-3


def _analytic_gain(sigmas, heun):
    """For the Gaussian oracle the ODE is linear in y = x − MU: each step multiplies y by a known factor."""
    k = lambda s: s / (S**2 + s**2)  # dy/dσ = k(σ)·y
    gain = 1.0
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        h = s_next - s
        euler = 1 + h * k(s)
        gain *= euler if (not heun or s_next == 0) else 1 + 0.5 * h * (k(s) + k(s_next) * euler)
    return gain


@pytest.mark.parametrize("sampler_cls,heun", [(EulerSampler, False), (HeunSampler, True)])
def test_sampler_steps_match_the_exact_discretisation(sampler_cls, heun):
    sampler = sampler_cls()  # 25 release steps
    x = initial_latents((1000,), 700.0, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sampler(gaussian_oracle, x)
    gain = _analytic_gain(sampler.sigmas().double(), heun)
    torch.testing.assert_close(out, MU + gain * (x - MU), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampler", [EulerSampler(num_steps=400), HeunSampler(num_steps=80),
                                     HeunSampler(num_steps=100, s_churn=30.0)],
                         ids=["euler", "heun", "heun-churn"])
def test_sampler_reproduces_gaussian_data_with_an_oracle_denoiser(sampler):
    out = sampler.generate(gaussian_oracle, (20_000,), generator=torch.Generator().manual_seed(0))
    assert out.mean().item() == pytest.approx(MU, abs=0.012)
    assert out.std().item() == pytest.approx(S, rel=0.02)


# --- guidance ----------------------------------------------------------------------------------------

def test_linear_frame_guidance_scales_are_the_release_ramp():
    scales = LinearFrameGuidance().scales(24)
    torch.testing.assert_close(scales, torch.linspace(1.0, 4.0, 24))
    assert scales[0].item() == 1.0 and scales[-1].item() == 4.0
    assert scales[1].item() == pytest.approx(1.0 + 3.0 / 23)


def test_guided_denoiser_is_one_batched_forward_with_per_frame_ramp():
    B, T = 2, 6
    g = torch.Generator().manual_seed(0)
    cond = {
        "image_latents": torch.randn(B, T, 4, 4, 4, generator=g),
        "motion": torch.randn(B, T, 2, 4, 4, generator=g),
        "motion_context": torch.randn(B, T, 16, 8, generator=g),
        "added_time_ids": torch.tensor([[6.0, 127.0, 0.02]] * B),
    }
    uncond = unconditional(cond, ["image_latents", "motion", "motion_context"])
    calls = []

    def denoiser(x, sigma, image_latents, motion, motion_context, added_time_ids):
        calls.append((x.shape[0], sigma.clone(), image_latents.clone(), added_time_ids.clone()))
        return 0.5 * x + image_latents + motion.mean(dim=2, keepdim=True) + motion_context.mean(dim=(2, 3))[..., None, None, None]

    x = torch.randn(B, T, 4, 4, 4, generator=g)
    out = GuidedDenoiser(denoiser, LinearFrameGuidance(1.0, 4.0), cond, uncond)(x, 3.0)

    assert len(calls) == 1
    batch, sigma, image_latents, time_ids = calls[0]
    assert batch == 2 * B and sigma.tolist() == [3.0] * (2 * B)
    assert torch.equal(image_latents[:B], torch.zeros_like(cond["image_latents"]))  # uncond first
    assert torch.equal(image_latents[B:], cond["image_latents"])
    assert torch.equal(time_ids, torch.cat([cond["added_time_ids"]] * 2))

    d_uncond = denoiser(x, torch.full((B,), 3.0), **uncond)
    d_cond = denoiser(x, torch.full((B,), 3.0), **cond)
    scales = torch.linspace(1.0, 4.0, T)
    for t in range(T):
        expected = d_uncond[:, t] + scales[t] * (d_cond[:, t] - d_uncond[:, t])
        torch.testing.assert_close(out[:, t], expected)
    torch.testing.assert_close(out[:, 0], d_cond[:, 0])  # scale 1: purely conditional
    assert not torch.allclose(out[:, -1], d_cond[:, -1])


def test_constant_guidance_and_unconditional():
    d_u, d_c = torch.zeros(2, 3), torch.ones(2, 3)
    torch.testing.assert_close(ConstantGuidance(2.5)(d_u, d_c), torch.full((2, 3), 2.5))
    cond = {"a": torch.ones(2, 3), "b": torch.ones(2)}
    uncond = unconditional(cond, ["a"])
    assert torch.equal(uncond["a"], torch.zeros(2, 3)) and uncond["b"] is cond["b"]
    with pytest.raises(KeyError):
        unconditional(cond, ["missing"])
    with pytest.raises(ValueError):
        GuidedDenoiser(lambda x, s, **c: x, ConstantGuidance(1.0), {"n": 1}, {"n": 2})
