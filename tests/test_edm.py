"""EDM preconditioning, loss weighting, σ sampling, the Denoiser wrapper and the diffusion loss."""

import math

import pytest
import torch

from videolavit.diffusion.denoiser import Denoiser
from videolavit.diffusion.denoiser_scaling import (
    DiscreteTimeScaling,
    EDMScaling,
    EpsScaling,
    VScaling,
    VScalingWithEDMcNoise,
)
from videolavit.diffusion.edm import DiffusionLoss
from videolavit.diffusion.loss_weighting import (
    EDMWeighting,
    EpsWeighting,
    UnitWeighting,
    VWeighting,
    weighting_for,
)
from videolavit.diffusion.sigma_sampling import LogNormalSigmaSampler

SIGMAS = torch.logspace(-3, math.log10(700.0), 50, dtype=torch.float64)

PAIRS = [
    (EDMScaling(0.5), EDMWeighting(0.5)),
    (EDMScaling(1.3), EDMWeighting(1.3)),
    (VScalingWithEDMcNoise(), VWeighting()),
    (VScaling(), VWeighting()),
    (EpsScaling(), EpsWeighting()),
]


@pytest.mark.parametrize("scaling,weighting", PAIRS, ids=lambda p: type(p).__name__)
def test_weighting_times_c_out_squared_is_one(scaling, weighting):
    _, c_out, _, _ = scaling(SIGMAS)
    torch.testing.assert_close(weighting(SIGMAS) * c_out**2, torch.ones_like(SIGMAS), rtol=1e-12, atol=0)
    # weighting_for picks the same pair
    torch.testing.assert_close(weighting_for(scaling)(SIGMAS), weighting(SIGMAS), rtol=1e-12, atol=0)


def test_unit_weighting_is_not_consistent_with_edm():
    _, c_out, _, _ = EDMScaling(0.5)(SIGMAS)
    assert not torch.allclose(UnitWeighting()(SIGMAS) * c_out**2, torch.ones_like(SIGMAS))


def test_edm_formulas_at_a_point():
    sigma, sd = torch.tensor([2.0], dtype=torch.float64), 0.5
    c_skip, c_out, c_in, c_noise = EDMScaling(sd)(sigma)
    assert c_skip.item() == pytest.approx(0.25 / 4.25)
    assert c_out.item() == pytest.approx(2 * 0.5 / math.sqrt(4.25))
    assert c_in.item() == pytest.approx(1 / math.sqrt(4.25))
    assert c_noise.item() == pytest.approx(0.25 * math.log(2.0))


def test_v_scaling_is_edm_with_unit_sigma_data_and_flipped_c_out():
    v = VScalingWithEDMcNoise()(SIGMAS)
    e = EDMScaling(1.0)(SIGMAS)
    torch.testing.assert_close(v[0], e[0])
    torch.testing.assert_close(v[1], -e[1])
    torch.testing.assert_close(v[2], e[2])
    torch.testing.assert_close(v[3], e[3])


def test_v_scaling_recovers_x0_from_the_true_v():
    """SVD's convention: F predicts v = α·ε − σ̄·x0 of the VP latent; D must then be exactly x0."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.3, 1.0, 5.0, 80.0, 700.0], dtype=torch.float64)
    s = sigma[:, None, None, None]
    alpha, sigma_bar = 1 / (1 + s**2).sqrt(), s / (1 + s**2).sqrt()
    v = alpha * eps - sigma_bar * x0

    denoiser = Denoiser(lambda x_in, c_noise: v, VScalingWithEDMcNoise())
    torch.testing.assert_close(denoiser(x0 + s * eps, sigma), x0, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("scaling", [EDMScaling(0.5), VScalingWithEDMcNoise(), EpsScaling()],
                         ids=lambda s: type(s).__name__)
def test_denoiser_returns_its_input_as_sigma_goes_to_zero(scaling):
    c_skip, c_out, _, _ = scaling(torch.tensor([1e-8], dtype=torch.float64))
    assert c_skip.item() == pytest.approx(1.0, abs=1e-12)
    assert abs(c_out.item()) < 1e-7

    g = torch.Generator().manual_seed(1)
    net = torch.nn.Conv2d(3, 3, 3, padding=1)
    denoiser = Denoiser(lambda x, c_noise: net(x), scaling)
    x = torch.randn(2, 3, 8, 8, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(denoiser(x, 1e-7), x, rtol=0, atol=1e-5)
        assert (denoiser(x, 1.0) - x).abs().max() > 1e-2  # and it does not at σ = 1


@pytest.mark.parametrize("scaling,sigma_data", [(EDMScaling(0.5), 0.5), (EDMScaling(2.0), 2.0),
                                                (VScalingWithEDMcNoise(), 1.0)])
@pytest.mark.parametrize("sigma", [0.01, 1.0, 30.0, 700.0])
def test_c_in_gives_unit_variance_network_input(scaling, sigma_data, sigma):
    g = torch.Generator().manual_seed(2)
    x0 = sigma_data * torch.randn(200_000, generator=g, dtype=torch.float64)
    x = x0 + sigma * torch.randn(200_000, generator=g, dtype=torch.float64)
    _, _, c_in, _ = scaling(torch.tensor([sigma], dtype=torch.float64))
    assert (c_in * x).std().item() == pytest.approx(1.0, abs=0.01)


def test_discrete_time_scaling_maps_sigma_to_the_nearest_timestep():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    scaling = DiscreteTimeScaling(EpsScaling(), alphas_cumprod)
    t = torch.tensor([0, 1, 17, 500, 999])
    sigma = ((1 - alphas_cumprod[t]) / alphas_cumprod[t]).sqrt().float()
    c_skip, c_out, c_in, c_noise = scaling(sigma)
    assert c_noise.tolist() == t.tolist()
    torch.testing.assert_close(c_out, -sigma)
    torch.testing.assert_close(c_skip, torch.ones_like(sigma))
    assert weighting_for(scaling)(sigma).tolist() == pytest.approx((1 / sigma**2).tolist())


def test_lognormal_sigma_sampler_statistics():
    g = torch.Generator().manual_seed(3)
    log_sigma = LogNormalSigmaSampler()(200_000, generator=g).log()
    assert log_sigma.mean().item() == pytest.approx(1.0, abs=0.015)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.015)

    log_sigma = LogNormalSigmaSampler(p_mean=0.7, p_std=1.6)(200_000, generator=g).log()
    assert log_sigma.mean().item() == pytest.approx(0.7, abs=0.02)
    assert log_sigma.std().item() == pytest.approx(1.6, abs=0.02)


def test_lognormal_sigma_sampler_is_seeded():
    a = LogNormalSigmaSampler()(8, generator=torch.Generator().manual_seed(5))
    b = LogNormalSigmaSampler()(8, generator=torch.Generator().manual_seed(5))
    c = LogNormalSigmaSampler()(8, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (8,) and a.dtype == torch.float32 and (a > 0).all()


class TargetPlusOffset(torch.nn.Module):
    """A 'network' that outputs its exact EDM training target plus a constant offset δ.

    Knowing x0, it recovers x and σ from its inputs (c_noise = ¼ log σ for both scalings used here),
    so the weighted loss must come out as δ² exactly when λ·c_out² = 1.
    """

    def __init__(self, x0, scaling, offset):
        super().__init__()
        self.x0, self.scaling, self.offset = x0, scaling, offset
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_in, c_noise):
        sigma = (4 * c_noise).exp()
        c_skip, c_out, c_in, _ = (c.reshape(-1, *([1] * (x_in.ndim - 1))) for c in self.scaling(sigma))
        x = x_in / c_in
        return (self.x0 - c_skip * x) / c_out + self.offset + self.bias


@pytest.mark.parametrize("scaling", [EDMScaling(0.5), VScalingWithEDMcNoise()], ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("offset", [0.0, 0.5, 2.0])
def test_diffusion_loss_equals_network_target_error(scaling, offset):
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(16, 5, 4, 8, 8, generator=g, dtype=torch.float64)  # [B, T, C, H, W]
    denoiser = Denoiser(TargetPlusOffset(x0, scaling, offset).double(), scaling)
    loss = DiffusionLoss()(denoiser, x0, generator=g)
    assert loss.item() == pytest.approx(offset**2, abs=1e-6)


def test_diffusion_loss_one_sigma_per_sample_shared_by_frames_and_trains_the_net():
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(6, 8, 4, 8, 8, generator=g)  # [B, T, C, H, W]
    seen = {}

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.tensor(0.1))

        def forward(self, x_in, c_noise, motion):
            seen.update(x_in=x_in.detach(), c_noise=c_noise.detach(), motion=motion)
            return self.weight * x_in

    denoiser = Denoiser(Recorder(), VScalingWithEDMcNoise())
    motion = torch.zeros(6, 8, 2, 8, 8)
    terms = DiffusionLoss().terms(denoiser, x0, {"motion": motion}, generator=g)

    assert seen["motion"] is motion
    assert seen["c_noise"].shape == (6,)
    torch.testing.assert_close(seen["c_noise"], 0.25 * terms.sigma.log())
    # Undo c_in per sample: the added noise must have unit std in every sample, over all its frames.
    sigma = terms.sigma.reshape(6, 1, 1, 1, 1)
    noise = (seen["x_in"] * (sigma**2 + 1).sqrt() - x0) / sigma
    per_sample_std = noise.flatten(1).std(dim=1)
    torch.testing.assert_close(per_sample_std, torch.ones(6), rtol=0, atol=0.1)
    per_frame_std = noise.flatten(2).std(dim=2)  # [B, T]
    torch.testing.assert_close(per_frame_std, torch.ones(6, 8), rtol=0, atol=0.25)

    assert terms.per_sample.shape == (6,)
    torch.testing.assert_close(terms.loss, terms.per_sample.mean())
    terms.loss.backward()
    assert list(denoiser.parameters()) == [denoiser.net.weight]
    assert denoiser.net.weight.grad is not None and denoiser.net.weight.grad.abs() > 0


def test_diffusion_loss_is_seeded_and_works_on_images():
    net = torch.nn.Conv2d(4, 4, 1)
    denoiser = Denoiser(lambda x, c_noise: net(x), EDMScaling(0.5))
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # [B, C, H, W]
    loss = DiffusionLoss(loss_weighting=EDMWeighting(0.5))
    a = loss(denoiser, x0, generator=torch.Generator().manual_seed(1))
    b = loss(denoiser, x0, generator=torch.Generator().manual_seed(1))
    c = loss(denoiser, x0, generator=torch.Generator().manual_seed(2))
    assert a.ndim == 0 and torch.equal(a, b) and not torch.equal(a, c)
