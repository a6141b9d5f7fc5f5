"""g_V reproduces the release: U-Net call, motion conditioning and a full sampling loop on the same random
weights, against numbers computed once by the release's code (tests/data/README.md)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKLTemporalDecoder

from tests import release_fixtures as F
from videolavit.models.latent_space import LatentSpace, VaeLatentSpace
from videolavit.models.video_detokenizer import VideoDetokenizer, VideoDetokenizerConfig, release_behaviour

TOLERANCE = 1e-4  # relative, as the issue asks of U-Net outputs and final latents


class InMemoryVae(LatentSpace):
    """VaeLatentSpace's encode/decode around a VAE built here (the class loads from a directory)."""

    encode = VaeLatentSpace.encode
    decode = VaeLatentSpace.decode

    def __init__(self, vae):
        super().__init__()
        self.vae, self.channels, self.downsample = vae, 4, 8
        self.scaling_factor, self.temporal_decoder, self.chunk, self.sample_posterior = 0.18215, True, 16, False


@pytest.fixture(scope="module")
def reference():
    return F.load_reference()


@pytest.fixture(scope="module")
def space():
    return InMemoryVae(F.fill_(AutoencoderKLTemporalDecoder(**F.TINY_VAE), seed=12).eval())


def detokenizer(config: VideoDetokenizerConfig) -> VideoDetokenizer:
    return F.fill_(VideoDetokenizer(config), seed=11).eval()


@pytest.fixture(scope="module")
def release_model():
    return detokenizer(release_behaviour(F.gv_config(), 0.18215))


@pytest.fixture(scope="module")
def ours_model():
    return detokenizer(F.gv_config())


def with_config(model: VideoDetokenizer, **changes) -> VideoDetokenizer:
    """The same weights under other behaviour switches (the module keeps a reference to its config)."""
    twin = VideoDetokenizer.__new__(VideoDetokenizer)
    twin.__dict__.update(model.__dict__)
    twin.config = dataclasses.replace(model.config, **changes)
    return twin


def test_release_behaviour_sets_every_switch_and_keeps_the_sizes():
    ours = F.gv_config()
    release = release_behaviour(ours, 0.18215)
    assert not ours.is_release and release.is_release
    assert release.unet.temporal_context_resize == "nearest" and release.motion_resize == "bicubic"
    assert release.noise_aug_space == "pixels" and release.decode_chunk_frames == 8
    assert release.keyframe_latent_scale == pytest.approx(1 / 0.18215)
    assert dataclasses.replace(release.unet, temporal_context_resize="bilinear") == ours.unet
    with pytest.raises(ValueError, match="motion_resize"):
        F.gv_config(motion_resize="cubic")
    with pytest.raises(ValueError, match="temporal_context_resize"):
        dataclasses.replace(ours.unet, temporal_context_resize="area")


def test_unet_call_equals_the_release(reference, release_model, ours_model):
    with torch.no_grad():
        release = release_model.unet(*F.unet_call_inputs())
        assert F.max_relative_difference(release, reference["gv_unet_call"]) < TOLERANCE
        ours = ours_model.unet(*F.unet_call_inputs())  # bilinear temporal context: not the release's numbers
        assert F.max_relative_difference(ours, reference["gv_unet_call"]) > 1e-3


def test_conditioning_equals_the_release(reference, space, release_model, ours_model):
    model = release_model
    inputs = F.gv_inputs()
    with torch.no_grad():
        cond = model.conditioning(torch.zeros(1, 4, 12, 20), inputs["motion"])
        field = cond["motion_field"].permute(0, 2, 1, 3, 4)
        assert F.max_relative_difference(field, reference["gv_motion_field"]) < TOLERANCE
        assert F.max_relative_difference(cond["motion_context"], reference["gv_motion_context"]) < TOLERANCE
        latent = with_config(model, noise_aug_strength=0.0).keyframe_latent(space, inputs["keyframe"])
        assert F.max_relative_difference(latent, reference["gv_keyframe_latent"]) < TOLERANCE  # unscaled
        ours = ours_model.conditioning(torch.zeros(1, 4, 12, 20), inputs["motion"])
        assert F.max_relative_difference(ours["motion_context"], reference["gv_motion_context"]) > 1e-3


@pytest.mark.slow
def test_sampling_loop_and_decoded_frames_equal_the_release(reference, space, release_model):
    model = release_model
    inputs = F.gv_inputs()
    generator = torch.Generator().manual_seed(reference["gv_loop_seed"])  # the release draws from the global seed
    with torch.no_grad():
        latent = model.keyframe_latent(space, inputs["keyframe"], generator=generator)  # pixel noise first
        cond = model.conditioning(latent, inputs["motion"], generator=generator)
        latents = model.sample(cond, F.GV_FRAMES, num_steps=reference["gv_loop_steps"], guidance=(1.0, 4.0),
                               generator=generator)
        assert F.max_relative_difference(latents, reference["gv_loop_latents"]) < TOLERANCE
        frames = model.decode(space, latents).unflatten(0, (1, F.GV_FRAMES)).permute(0, 2, 1, 3, 4)
        assert F.max_relative_difference(frames, reference["gv_loop_frames"]) < TOLERANCE
        joined = with_config(model, decode_chunk_frames=None).decode(space, latents)  # one call mixes all 12
        assert (joined - model.decode(space, latents)).abs().max() > 1e-4
