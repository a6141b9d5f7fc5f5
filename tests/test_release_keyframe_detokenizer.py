"""g_I as the release samples it: DDIM (CFG) and ancestral Euler on the timesteps of the release's diffusers
scheduler config, non-square images, and its `.bin` U-Net weights (read with weights_only)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

from tests.test_keyframe_detokenizer import DECODER, NUM_CODES, CODE_DIM, UNET, some_ids
from videolavit.models.keyframe_detokenizer import (
    KeyframeDetokenizer,
    KeyframeDetokenizerConfig,
    KeyframeDiffusionConfig,
)
from videolavit.models.keyframe_feature_decoder import KeyframeFeatureDecoderConfig
from videolavit.models.keyframe_unet import KeyframeUNetConfig

# SDXL's DDIM scheduler config, as the release's image_detokenizer/scheduler holds it
RELEASE_DDIM = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "clip_sample": False, "num_train_timesteps": 1000,
                "prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1,
                "timestep_spacing": "leading"}
RELEASE_EULER_A = {**RELEASE_DDIM, "_class_name": "EulerAncestralDiscreteScheduler"}
NON_SQUARE = (8, 16)  # height, width (the release makes 576x1024 keyframes)


def config(sampler: str, scheduler: dict, image_size=NON_SQUARE) -> KeyframeDetokenizerConfig:
    diffusion = KeyframeDiffusionConfig(scaling="eps_discrete", sampler=sampler, scheduler=scheduler,
                                        guidance_scale=7.0)
    return KeyframeDetokenizerConfig(unet=KeyframeUNetConfig(**UNET), decoder=KeyframeFeatureDecoderConfig(**DECODER),
                                     diffusion=diffusion, num_codes=NUM_CODES, code_dim=CODE_DIM,
                                     image_size=image_size, latent_downsample=1)


def model(sampler: str, scheduler: dict) -> KeyframeDetokenizer:
    torch.manual_seed(0)
    return KeyframeDetokenizer(config(sampler, scheduler)).eval()


def diffusers_loop(detokenizer: KeyframeDetokenizer, scheduler, cond: dict, steps: int, scale: float,
                   generator: torch.Generator) -> torch.Tensor:
    """The release's image_decoding loop: [uncond (zeroed), cond] batch, CFG on ε, scheduler.step."""
    shape = detokenizer.latent_shape(cond["context"].shape[0])
    latents = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma  # before set_timesteps, as there
    scheduler.set_timesteps(steps)
    pair = {k: torch.cat([torch.zeros_like(v) if k in ("context", "pooled") else v, v]) for k, v in cond.items()}
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        eps = detokenizer.unet(x_in, t.float().expand(x_in.shape[0]), **pair)
        uncond, conditional = eps.chunk(2)
        latents = scheduler.step(uncond + scale * (conditional - uncond), t, latents, generator=generator).prev_sample
    return latents


@pytest.mark.parametrize("sampler, scheduler_config, cls", [("ddim", RELEASE_DDIM, DDIMScheduler),
                                                            ("euler_ancestral", RELEASE_EULER_A,
                                                             EulerAncestralDiscreteScheduler)])
def test_release_samplers_take_the_release_schedulers_steps(sampler, scheduler_config, cls):
    detokenizer = model(sampler, scheduler_config)
    cond = detokenizer.conditioning(some_ids()[:2])
    assert cond["time_ids"][0].tolist() == [8, 16, 0, 0, 8, 16]  # SDXL size ids of a non-square image
    with torch.no_grad():
        ours = detokenizer.sample(cond, num_steps=6, generator=torch.Generator().manual_seed(3))
        scheduler = cls.from_config(scheduler_config)
        reference = diffusers_loop(detokenizer, scheduler, cond, 6, 7.0, torch.Generator().manual_seed(3))
    assert ours.shape == (2, 3, *NON_SQUARE)
    assert ((ours - reference).norm() / reference.norm()).item() < 1e-4


def test_ddim_final_step_goes_to_alpha_zero_unless_set_alpha_to_one():
    to_zero = model("ddim", {**RELEASE_DDIM, "set_alpha_to_one": True}).sigmas(5)
    release = model("ddim", RELEASE_DDIM).sigmas(5)
    assert to_zero[-1] == 0 and 0.02 < release[-1] < 0.05  # σ of ᾱ_0 on SDXL's schedule
    assert torch.equal(to_zero[:-1], release[:-1]) and (release[1:] < release[:-1]).all()


def test_release_sampler_configs_are_checked():
    with pytest.raises(ValueError, match="needs diffusion.scheduler"):
        KeyframeDiffusionConfig(sampler="ddim")
    with pytest.raises(ValueError, match="discrete scaling"):
        KeyframeDiffusionConfig(scaling="edm", sampler="ddim", scheduler=RELEASE_DDIM)
    with pytest.raises(ValueError, match="clip_sample"):
        KeyframeDiffusionConfig(sampler="ddim", scheduler={**RELEASE_DDIM, "clip_sample": True})
    with pytest.raises(ValueError, match="sampler must be one of"):
        KeyframeDiffusionConfig(sampler="heun")
    with pytest.raises(ValueError, match="not divisible"):
        config("ddim", RELEASE_DDIM, image_size=(8, 17))
    square = config("ddim", RELEASE_DDIM, image_size=16)
    assert square.latent_size == 16 and config("ddim", RELEASE_DDIM).latent_hw == NON_SQUARE
    with pytest.raises(ValueError, match="not square"):
        config("ddim", RELEASE_DDIM).latent_size
    assert KeyframeDetokenizerConfig(**{**dataclasses.asdict(config("ddim", RELEASE_DDIM)),
                                        "image_size": [8, 16]}).image_size == NON_SQUARE  # JSON round trip


def test_the_release_bin_unet_weights_load_and_hostile_pickles_are_refused(tmp_path):
    from videolavit.models.keyframe_unet import KeyframeUNet, load_shared_unet_weights
    from videolavit.release.checkpoint import ReleaseCheckpointError

    torch.manual_seed(1)
    source = KeyframeUNet(KeyframeUNetConfig(**UNET))
    unet_dir = tmp_path / "image_detokenizer" / "unet"
    unet_dir.mkdir(parents=True)
    torch.save(source.net.state_dict(), unet_dir / "diffusion_pytorch_model.bin")
    torch.manual_seed(2)
    target = KeyframeUNet(KeyframeUNetConfig(**UNET))
    report = load_shared_unet_weights(target, tmp_path / "image_detokenizer")
    assert not report.missing and not report.mismatched and len(report.loaded) == len(source.net.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))

    class Payload:  # a pickle that would run code when unpickled without weights_only
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"conv_in.weight": Payload()}, unet_dir / "diffusion_pytorch_model.bin")
    with pytest.raises(ReleaseCheckpointError, match="weights_only"):
        load_shared_unet_weights(target, tmp_path / "image_detokenizer")


@pytest.mark.parametrize("sampler, class_name", [("ddim", "DDIMScheduler"),
                                                 ("euler_ancestral", "EulerAncestralDiscreteScheduler")])
def test_release_keyframe_loops_equal_the_release_code(sampler, class_name):
    """Against the release's own image_decoding (tests/data/README.md): 576x1024-like non-square latents."""
    from tests import release_fixtures as F
    from videolavit.models.keyframe_detokenizer import SDXL_DDIM

    model = F.gi_model(sampler, {**SDXL_DDIM, "_class_name": class_name})
    cond = model.conditioning(torch.tensor(F.GI_IDS))
    with torch.no_grad():  # the release draws its initial noise, then the ancestral noise, from the global seed
        latents = model.sample(cond, generator=torch.Generator().manual_seed(F.GI_SEED))
    assert F.max_relative_difference(latents, F.load_reference()[f"gi_{sampler}_latents"]) < 1e-4
