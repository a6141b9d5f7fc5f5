"""The detokenizers' latent spaces: pixel identity and a frozen local VAE."""

import pytest
import torch
from diffusers import AutoencoderKL

from videolavit.metrics.weights import MissingWeightsError
from videolavit.models.latent_space import PixelSpace, VaeLatentSpace, images_to_uint8, images_to_unit_range


def test_uint8_round_trip():
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(images_to_uint8(images_to_unit_range(images)), images)
    assert images_to_unit_range(images).min() >= -1 and images_to_unit_range(images).max() <= 1


def test_pixel_space_round_trip_and_scale():
    space = PixelSpace(scale=0.5)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    latents = space.encode(images)
    assert torch.allclose(latents, images * 0.5)
    assert torch.allclose(space.decode(latents), images)
    assert space.latent_size(32, 32) == (32, 32)


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, scaling_factor=0.2)
    root = tmp_path_factory.mktemp("svd")
    vae.save_pretrained(root / "vae")
    return root


def test_vae_space_shapes_scaling_and_frozen(tiny_vae_dir):
    space = VaeLatentSpace(str(tiny_vae_dir))  # finds the vae/ subfolder
    assert (space.channels, space.downsample) == (4, 2)
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    latents = space.encode(images)
    assert latents.shape == (3, 4, 8, 8)
    raw = space.vae.encode(images_to_unit_range(images)).latent_dist.mode()
    assert torch.allclose(latents, raw * 0.2, atol=1e-6)
    decoded = space.decode(latents)
    assert decoded.shape == (3, 3, 16, 16) and decoded.abs().max() <= 1
    assert not any(p.requires_grad for p in space.parameters())
    space.train()
    assert not space.vae.training
    with pytest.raises(ValueError, match="divisible"):
        space.latent_size(15, 16)


def test_vae_space_missing_directory_names_the_option(tmp_path):
    with pytest.raises(MissingWeightsError, match="latent_space.init_args.path"):
        VaeLatentSpace(str(tmp_path / "nope"))


def test_spec_round_trip_rebuilds_the_same_space(tiny_vae_dir):
    from videolavit.models.latent_space import build_latent_space, latent_space_spec

    pixel = build_latent_space(latent_space_spec(PixelSpace(scale=0.5)))
    assert isinstance(pixel, PixelSpace) and pixel.scale == 0.5
    vae = VaeLatentSpace(str(tiny_vae_dir), chunk=3)
    rebuilt = build_latent_space(latent_space_spec(vae))
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(rebuilt.encode(images), vae.encode(images)) and rebuilt.chunk == 3
    with pytest.raises(ValueError, match="not a videolavit LatentSpace"):
        build_latent_space({"class_path": "torch.nn.Identity"})
