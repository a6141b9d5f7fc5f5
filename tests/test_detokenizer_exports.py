"""Detokenizer exports as diffusers-style directories: the U-Nets load with diffusers' own ``from_pretrained``,
the VAE and scheduler sit in subfolders referenced by relative paths only (the directory can move), exports of
the earlier single-file layout still load, and hostile records are refused."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, EDMEulerScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from videolavit.diffusion.denoiser_scaling import VScalingWithEDMcNoise
from videolavit.diffusion.parameterization import DeprecatedScalingWarning
from videolavit.models.export import ExportError, UnregisteredClassError, save_export
from videolavit.models.keyframe_detokenizer import (
    KeyframeDetokenizer,
    KeyframeDetokenizerConfig,
    KeyframeDiffusionConfig,
    load_keyframe_detokenizer,
    save_keyframe_detokenizer,
)
from videolavit.models.keyframe_feature_decoder import KeyframeFeatureDecoderConfig
from videolavit.models.keyframe_unet import KeyframeUNetConfig, time_ids
from videolavit.models.latent_space import PixelSpace, VaeLatentSpace, build_latent_space, latent_space_spec
from videolavit.models.motion_condition_encoder import MotionConditionEncoderConfig
from videolavit.models.video_detokenizer import (
    VideoDetokenizer,
    VideoDetokenizerConfig,
    VideoDetokenizerSpec,
    load_video_detokenizer,
    read_video_detokenizer_spec,
    save_video_detokenizer,
)
from videolavit.models.video_unet import VideoUNet, VideoUNetConfig

NUM_CODES, CODE_DIM = 64, 8
DECODER = dict(code_dim=CODE_DIM, width=32, depth=1, num_heads=2, mlp_dim=64, num_queries=16, max_codes=16,
               feature_dim=32, unet_context_dims=(12, 20), unet_pooled_dim=20)
KEYFRAME_UNET = dict(block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                     transformer_layers_per_block=(1, 1), num_heads=(2, 2), context_dim=32, pooled_dim=20,
                     addition_time_embed_dim=8, norm_num_groups=8)
VIDEO_UNET = dict(down_block_types=("DownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal"),
                  up_block_types=("CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal"), block_out_channels=(32, 32),
                  layers_per_block=1, num_attention_heads=(1, 2), cross_attention_dim=16, addition_time_embed_dim=8,
                  motion_grid=(4, 4), norm_num_groups=8, temporal_context_resize="nearest")
PIXELS = latent_space_spec(PixelSpace(scale=1.0))


def keyframe_detokenizer(channels: int = 3, downsample: int = 1, scaling: str = "eps_discrete") -> KeyframeDetokenizer:
    torch.manual_seed(0)
    config = KeyframeDetokenizerConfig(
        unet=KeyframeUNetConfig(**KEYFRAME_UNET, in_channels=channels, out_channels=channels),
        decoder=KeyframeFeatureDecoderConfig(**DECODER), diffusion=KeyframeDiffusionConfig(scaling=scaling),
        num_codes=NUM_CODES, code_dim=CODE_DIM, image_size=16, latent_downsample=downsample)
    return KeyframeDetokenizer(config).eval()


def video_detokenizer(channels: int = 3) -> VideoDetokenizer:
    torch.manual_seed(0)
    return VideoDetokenizer(VideoDetokenizerConfig(
        unet=VideoUNetConfig(**VIDEO_UNET, latent_channels=channels),
        motion_encoder=MotionConditionEncoderConfig(height=4, width=4, dim=16, depth=1, num_heads=2, out_dim=16),
        scaling="edm", sigma_max=80.0)).eval()


def video_spec(latent_space: dict = PIXELS) -> VideoDetokenizerSpec:
    return VideoDetokenizerSpec(latent_space=latent_space, frame_size=(8, 8), num_frames=3, motion_grid=(6, 6),
                                motion_scale=10.0)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, scaling_factor=0.2)
    root = tmp_path_factory.mktemp("sdxl")
    vae.save_pretrained(root / "vae")
    return root


def json_strings(directory: Path) -> list[str]:
    """Every string in every JSON file under ``directory`` (keys and values)."""
    found: list[str] = []

    def walk(value):
        if isinstance(value, dict):
            for k, v in value.items():
                found.append(str(k))
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str):
            found.append(value)

    for path in directory.rglob("*.json"):
        walk(json.loads(path.read_text()))
    return found


def keyframe_unet_inputs(channels: int = 3, size: int = 16):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(2, channels, size, size, generator=g), torch.tensor([10.0, 500.0]),
            torch.randn(2, 7, 32, generator=g), torch.randn(2, 20, generator=g), time_ids(2, size, size))


# ---- keyframe detokenizer --------------------------------------------------------------------------------

def test_keyframe_unet_loads_with_diffusers_and_computes_what_our_model_computes(tmp_path):
    model = keyframe_detokenizer()
    save_keyframe_detokenizer(model, tmp_path, PIXELS, provenance={"directory": str(tmp_path.parent / "tok")})
    assert (tmp_path / "unet" / "config.json").is_file()
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    rest = load_file(str(tmp_path / "keyframe_detokenizer.safetensors"))
    assert rest and not any(k.startswith("unet.") for k in rest)  # the U-Net lives in unet/ only
    scheduler = DDIMScheduler.from_pretrained(str(tmp_path / "scheduler"))
    assert scheduler.config.prediction_type == "epsilon" and scheduler.config.beta_schedule == "scaled_linear"

    ours = load_keyframe_detokenizer(tmp_path)
    theirs = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet")).eval()
    x, t, context, pooled, ids = keyframe_unet_inputs()
    with torch.no_grad():
        expected = ours.unet(x, t, context=context, pooled=pooled, time_ids=ids)
        got = theirs(x, t, encoder_hidden_states=context,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got - expected).abs().max() < 1e-3 * expected.abs().max()
    # and the whole loaded model samples as the saved one
    codes = torch.randint(0, NUM_CODES, (2, 5), generator=torch.Generator().manual_seed(1))
    samples = [m.sample(m.conditioning(codes), num_steps=2, generator=torch.Generator().manual_seed(2))
               for m in (model, ours)]
    assert torch.allclose(samples[0], samples[1], atol=1e-4)
    assert not [s for s in json_strings(tmp_path) if s.startswith("/")]


def test_keyframe_export_with_a_vae_keeps_it_inside_and_moves_with_the_directory(tmp_path, vae_dir):
    space = VaeLatentSpace(str(vae_dir))
    model = keyframe_detokenizer(channels=4, downsample=space.downsample, scaling="edm")
    save_keyframe_detokenizer(model, tmp_path / "exports" / "keyframe_detokenizer", space)
    assert EDMEulerScheduler.from_pretrained(str(tmp_path / "exports" / "keyframe_detokenizer" / "scheduler"))
    strings = json_strings(tmp_path / "exports")
    assert not [s for s in strings if s.startswith("/") or str(vae_dir) in s or str(tmp_path) in s]

    moved = tmp_path / "elsewhere"
    shutil.move(str(tmp_path / "exports"), str(moved))
    loaded = load_keyframe_detokenizer(moved / "keyframe_detokenizer")
    assert Path(loaded.latent_space_spec["init_args"]["path"]) == (moved / "keyframe_detokenizer" / "vae").resolve()
    rebuilt = build_latent_space(loaded.latent_space_spec)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(rebuilt.encode(images), space.encode(images))


def test_old_single_file_keyframe_export_still_loads(tmp_path, vae_dir):
    model = keyframe_detokenizer()
    old_space = {"class_path": "videolavit.models.latent_space.VaeLatentSpace",
                 "init_args": {"path": str(vae_dir), "subfolder": "vae", "temporal_decoder": False, "chunk": 16,
                               "sample_posterior": False}}
    save_export(model, tmp_path, "keyframe_detokenizer", model.config,  # what earlier versions wrote
                extra={"latent_space": old_space, "keyframe_tokenizer": {}})
    loaded = load_keyframe_detokenizer(tmp_path)
    assert loaded.latent_space_spec == old_space  # its absolute VAE path is kept
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())


def test_hostile_keyframe_records_are_refused(tmp_path):
    save_keyframe_detokenizer(keyframe_detokenizer(), tmp_path, PIXELS)
    record_path = tmp_path / "keyframe_detokenizer.json"
    record = json.loads(record_path.read_text())

    record_path.write_text(json.dumps({**record, "class_path": "os.system"}))
    with pytest.raises(UnregisteredClassError, match="not an exportable"):
        load_keyframe_detokenizer(tmp_path)
    record_path.write_text(json.dumps({**record, "extra": {**record["extra"], "unet": "../other"}}))
    with pytest.raises(ExportError, match="names U-Net folder '../other'"):
        load_keyframe_detokenizer(tmp_path)
    vae_space = {"class_path": "videolavit.models.latent_space.VaeLatentSpace", "init_args": {"path": "../../etc"}}
    record_path.write_text(json.dumps({**record, "extra": {**record["extra"], "latent_space": vae_space}}))
    with pytest.raises(ExportError, match="outside the export directory"):
        load_keyframe_detokenizer(tmp_path)
    record_path.write_text(json.dumps(record))

    unet_config = tmp_path / "unet" / "config.json"
    original = unet_config.read_text()
    unet_config.write_text(json.dumps({**json.loads(original), "cross_attention_dim": 64}))
    with pytest.raises(ExportError, match=r"does not match keyframe_detokenizer.json's U-Net config: \['cross_attention_dim'\]"):
        load_keyframe_detokenizer(tmp_path)
    unet_config.write_text(original)

    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"conv_in.weight": "../../evil.safetensors"}}))
    with pytest.raises(ExportError, match="names shards outside"):
        load_keyframe_detokenizer(tmp_path)


# ---- video detokenizer -----------------------------------------------------------------------------------

def test_video_unet_round_trips_through_from_pretrained(tmp_path):
    model = video_detokenizer()
    save_video_detokenizer(model, tmp_path, video_spec())
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["_class_name"] == "VideoUNet"
    rest = load_file(str(tmp_path / "video_detokenizer.safetensors"))
    assert rest and all(k.startswith("motion_encoder.") for k in rest)
    assert EDMEulerScheduler.from_pretrained(str(tmp_path / "scheduler")).config.sigma_max == 80.0

    unet = VideoUNet.from_pretrained(str(tmp_path / "unet")).eval()
    assert unet.video_config == model.unet.video_config
    assert type(unet.down_blocks[1].attentions[0]).__name__ == "MotionTransformerSpatioTemporal"
    ours = model.unet.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in unet.state_dict().items())
    g = torch.Generator().manual_seed(1)
    sample, context = torch.randn(1, 3, 8, 8, 8, generator=g), torch.randn(1, 3, 16, 16, generator=g)
    time = torch.tensor([[6.0, 127.0, 0.02]])
    with torch.no_grad():
        assert torch.allclose(unet(sample, 0.3, context, time), model.unet(sample, 0.3, context, time), atol=1e-5)

    restored, latent_config = load_video_detokenizer(tmp_path)
    assert restored.config == model.config and latent_config == PIXELS
    assert not [s for s in json_strings(tmp_path) if s.startswith("/")]


def test_video_export_with_a_vae_records_it_relative(tmp_path, vae_dir):
    space = {"class_path": "videolavit.models.latent_space.VaeLatentSpace",
             "init_args": {"path": str(vae_dir), "subfolder": "vae", "temporal_decoder": False, "chunk": 16,
                           "sample_posterior": False}}
    save_video_detokenizer(video_detokenizer(channels=4), tmp_path / "a", video_spec(space))
    assert (tmp_path / "a" / "vae" / "config.json").is_file()
    assert not [s for s in json_strings(tmp_path / "a") if s.startswith("/") or str(vae_dir) in s]
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    spec = read_video_detokenizer_spec(tmp_path / "b")
    assert Path(spec.latent_space["init_args"]["path"]) == (tmp_path / "b" / "vae").resolve()
    _, latent_config = load_video_detokenizer(tmp_path / "b")
    images = torch.rand(1, 3, 8, 8) * 2 - 1
    assert torch.equal(build_latent_space(latent_config).encode(images), build_latent_space(space).encode(images))


def test_old_single_file_video_export_still_loads(tmp_path):
    model = video_detokenizer()
    save_export(model, tmp_path, "video_detokenizer", model.config,
                extra={"spec": dataclasses.asdict(video_spec())})
    restored, latent_config = load_video_detokenizer(tmp_path)
    assert latent_config == PIXELS
    ours = model.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in restored.state_dict().items())


def test_a_video_export_with_the_old_scaling_name_loads_with_a_warning(tmp_path):
    save_video_detokenizer(video_detokenizer(), tmp_path, video_spec())
    record_path = tmp_path / "video_detokenizer.json"
    record = json.loads(record_path.read_text())
    record["config"]["scaling"] = "v"  # what exports of earlier versions recorded for SVD's v-prediction
    record_path.write_text(json.dumps(record))
    with pytest.warns(DeprecatedScalingWarning, match="'v' is deprecated, it is called 'v_edm'"):
        restored, _ = load_video_detokenizer(tmp_path)
    assert restored.config.scaling == "v_edm" and isinstance(restored.scaling, VScalingWithEDMcNoise)


def test_hostile_video_records_are_refused(tmp_path):
    save_video_detokenizer(video_detokenizer(), tmp_path, video_spec())
    record_path = tmp_path / "video_detokenizer.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "class_path": "subprocess.Popen"}))
    with pytest.raises(UnregisteredClassError, match="not an exportable"):
        load_video_detokenizer(tmp_path)
    record_path.write_text(json.dumps(record))

    unet_config = tmp_path / "unet" / "config.json"
    unet_config.write_text(json.dumps({**json.loads(unet_config.read_text()), "temporal_context_resize": "bilinear"}))
    with pytest.raises(ExportError, match=r"\['temporal_context_resize'\] differ"):
        load_video_detokenizer(tmp_path)

    # U-Net tensors in both places: an inconsistent directory, not silently one of them
    rest = load_file(str(tmp_path / "video_detokenizer.safetensors"))
    save_file({**rest, "unet.conv_in.weight": torch.zeros(1)}, str(tmp_path / "video_detokenizer.safetensors"))
    with pytest.raises(ExportError, match="holds U-Net tensors"):
        load_video_detokenizer(tmp_path)


def test_non_finite_detokenizers_write_nothing(tmp_path):
    from videolavit.models.export import NonFiniteExportError

    model = video_detokenizer()
    with torch.no_grad():
        model.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteExportError, match="unet.conv_in.weight"):
        save_video_detokenizer(model, tmp_path, video_spec())
    assert not any(tmp_path.iterdir())
