"""One diffusion construction for both detokenizers: a scaling name gives the same scaling, matched loss weighting
and training σ sampler in the keyframe and the video detokenizer; old names map to new ones with a warning."""

from __future__ import annotations

import warnings

import pytest
import torch

from videolavit.diffusion.denoiser_scaling import DiscreteTimeScaling, EDMScaling, EpsScaling, VScaling, \
    VScalingWithEDMcNoise
from videolavit.diffusion.loss_weighting import EDMWeighting, EpsWeighting, VWeighting
from videolavit.diffusion.parameterization import DeprecatedScalingWarning, build_parameterization, scaling_name
from videolavit.diffusion.sigma_sampling import DiscreteSigmaSampler, LogNormalSigmaSampler
from videolavit.models.keyframe_detokenizer import KeyframeDiffusionConfig
from videolavit.models.motion_condition_encoder import MotionConditionEncoderConfig
from videolavit.models.video_detokenizer import VideoDetokenizer, VideoDetokenizerConfig
from videolavit.models.video_unet import VideoUNetConfig

SIGMAS = torch.tensor([0.03, 0.5, 2.0, 14.0], dtype=torch.float64)
ALPHAS = KeyframeDiffusionConfig().alphas_cumprod()


def tiny_video(**overrides) -> VideoDetokenizer:
    unet = VideoUNetConfig(down_block_types=("DownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal"),
                           up_block_types=("CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"),
                           block_out_channels=(32, 32), layers_per_block=1, num_attention_heads=(1, 2),
                           cross_attention_dim=16, addition_time_embed_dim=8, motion_grid=(4, 4), norm_num_groups=8,
                           latent_channels=3)
    encoder = MotionConditionEncoderConfig(height=4, width=4, dim=16, depth=1, num_heads=2, out_dim=16)
    return VideoDetokenizer(VideoDetokenizerConfig(unet=unet, motion_encoder=encoder, **overrides))


@pytest.mark.parametrize("name,scaling,weighting,sampler", [
    ("edm", EDMScaling, EDMWeighting, LogNormalSigmaSampler),
    ("v_edm", VScalingWithEDMcNoise, VWeighting, LogNormalSigmaSampler),
    ("eps_discrete", DiscreteTimeScaling, EpsWeighting, DiscreteSigmaSampler),
    ("v_discrete", DiscreteTimeScaling, VWeighting, DiscreteSigmaSampler),
])
def test_each_name_builds_a_matched_scaling_weighting_and_sampler(name, scaling, weighting, sampler):
    parts = build_parameterization(name, sigma_data=0.4, alphas_cumprod=ALPHAS)
    assert type(parts.scaling) is scaling and type(parts.loss_weighting) is weighting
    assert isinstance(parts.sigma_sampler, sampler)
    _, c_out, _, _ = parts.scaling(SIGMAS)
    torch.testing.assert_close(parts.loss_weighting(SIGMAS) * c_out**2, torch.ones_like(SIGMAS))  # λ = 1/c_out²
    if name.endswith("_discrete"):
        assert type(parts.scaling.base) is (EpsScaling if name == "eps_discrete" else VScaling)
        drawn = parts.sigma_sampler(64, generator=torch.Generator().manual_seed(0))
        assert torch.isin(drawn, parts.sigma_sampler.sigmas).all()


@pytest.mark.parametrize("name", ["edm", "v_edm"])
def test_both_detokenizers_get_the_same_diffusion_from_the_same_name(name):
    keyframe = KeyframeDiffusionConfig(scaling=name, sigma_data=0.4, p_mean=1.0, p_std=1.2).parameterization()
    video = tiny_video(scaling=name, sigma_data=0.4, p_mean=1.0, p_std=1.2)
    assert type(video.scaling) is type(keyframe.scaling)
    for theirs, ours in zip(video.scaling(SIGMAS), keyframe.scaling(SIGMAS)):
        torch.testing.assert_close(theirs, ours)
    torch.testing.assert_close(video.diffusion_loss.loss_weighting(SIGMAS), keyframe.loss_weighting(SIGMAS))
    same = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    torch.testing.assert_close(video.diffusion_loss.sigma_sampler(16, generator=same[0]),
                               keyframe.sigma_sampler(16, generator=same[1]))


def test_the_old_video_name_maps_to_the_new_one_with_a_warning():
    with pytest.warns(DeprecatedScalingWarning, match="'v' is deprecated, it is called 'v_edm'"):
        model = tiny_video(scaling="v")
    assert model.config.scaling == "v_edm" and isinstance(model.scaling, VScalingWithEDMcNoise)
    with pytest.warns(DeprecatedScalingWarning):
        assert KeyframeDiffusionConfig(scaling="v").scaling == "v_edm"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scaling_name("v_edm") == "v_edm"  # the new names warn about nothing


def test_unknown_names_and_mismatched_choices_are_refused():
    with pytest.raises(ValueError, match=r"scaling must be one of \('v_edm', 'edm'\), got 'eps_discrete'"):
        tiny_video(scaling="eps_discrete")  # the video detokenizer has no DDPM schedule
    with pytest.raises(ValueError, match="scaling must be one of"):
        build_parameterization("ddpm")
    with pytest.raises(ValueError, match="pass its alphas_cumprod"):
        build_parameterization("eps_discrete")
    with pytest.raises(ValueError, match="needs a discrete scaling"):
        build_parameterization("edm", train_sigmas="discrete")
