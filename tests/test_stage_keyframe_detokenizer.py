"""Stage 1b keyframe detokenizer through the CLI users run: init_from builds the frozen tokenizer parts from a
keyframe tokenizer export, fit logs loss and reconstruction PSNR, checkpoints hold only what trains (no tokenizer,
no latent space, no frozen decoder trunk), resume rebuilds the frozen parts from the recorded export, and the
export reloads into the same sampler."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import AutoencoderKL

from stages.keyframe_detokenizer import SOURCE_KEY, KeyframeDetokenizerStage, check_tokenizer_export, psnr
from stages.keyframe_tokenizer import KeyframeTokenizerStage
from tests.tensorboard_scalars import scalars
from videolavit.cli import run_lightning_cli
from videolavit.config_files import read_config
from videolavit.models.export import ExportError
from videolavit.models.keyframe_detokenizer import (
    KeyframeDetokenizerConfig,
    KeyframeDiffusionConfig,
    load_keyframe_detokenizer,
)
from videolavit.models.keyframe_feature_decoder import KeyframeFeatureDecoderConfig
from videolavit.models.keyframe_tokenizer import KeyframeTokenizerConfig
from videolavit.models.keyframe_unet import KeyframeUNetConfig
from videolavit.models.latent_space import PixelSpace, VaeLatentSpace, build_latent_space

REPO = Path(__file__).resolve().parents[1]
VIEW_IMAGE, TOKENIZER_IMAGE, UNET_IMAGE = 32, 28, 16  # the view's, the ViT's, the U-Net's sizes all differ
VIT = dict(image_size=TOKENIZER_IMAGE, patch_size=7, width=32, depth=2, num_heads=2, mlp_dim=64, embed_dim=16)
TOKENIZER = dict(vit=VIT, merger_depth=1, merger_heads=2, merger_mlp_dim=64, num_codes=64, code_dim=8, llm_dim=24,
                 eval_selection="sample")
DECODER = dict(code_dim=8, width=32, depth=1, num_heads=2, mlp_dim=64, num_queries=16, max_codes=16, feature_dim=32,
               unet_context_dims=[12, 20], unet_pooled_dim=20)
UNET = dict(in_channels=3, out_channels=3, block_out_channels=[16, 32],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            layers_per_block=1, transformer_layers_per_block=[1, 1], num_heads=[2, 2], context_dim=32, pooled_dim=20,
            addition_time_embed_dim=8, norm_num_groups=8)
DIFFUSION = dict(scaling="edm", num_steps=3, guidance_scale=2.0)
TRAINED = ("detokenizer.unet.", "detokenizer.feature_decoder.unet_proj_1.", "detokenizer.feature_decoder.unet_proj_2.",
           "detokenizer.feature_decoder.unet_attnpool.")




@pytest.fixture(scope="module")
def tokenizer_export(tmp_path_factory) -> Path:
    """A keyframe tokenizer export as stage 1a writes it (random seeded ViT, untrained tokenizer)."""
    directory = tmp_path_factory.mktemp("keyframe_tokenizer_export")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        KeyframeTokenizerStage(tokenizer=KeyframeTokenizerConfig(**TOKENIZER),
                               decoder=KeyframeFeatureDecoderConfig(**DECODER)).export(directory)
    return directory


def tiny_stage(init_from: Path | None, **kwargs) -> KeyframeDetokenizerStage:
    args = dict(unet=KeyframeUNetConfig(**UNET), diffusion=KeyframeDiffusionConfig(**DIFFUSION), image_size=UNET_IMAGE,
                val_samples=4)
    return KeyframeDetokenizerStage(init_from=None if init_from is None else str(init_from), **{**args, **kwargs})


def write_config(root: Path, shards: Path, init_from: Path | None) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": 4,
            "val_check_interval": 2, "check_val_every_n_epoch": None, "log_every_n_steps": 1,
            "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
            "gradient_clip_val": 1.0,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(root / "logs"), "name": "keyframe_detokenizer"}},
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(root / "checkpoints"), "save_last": True,
                               "every_n_train_steps": 2, "save_top_k": -1, "enable_version_counter": False}},
                {"class_path": "callbacks.video_samples.VideoSampleLogger",
                 "init_args": {"num_videos": 2, "write_files": False}},
            ],
        },
        "model": {
            "class_path": "stages.keyframe_detokenizer.KeyframeDetokenizerStage",
            "init_args": {"init_from": None if init_from is None else str(init_from), "unet": UNET,
                          "diffusion": DIFFUSION, "image_size": UNET_IMAGE, "val_samples": 4,
                          "latent_space": {"class_path": "videolavit.models.latent_space.PixelSpace"},
                          "optimizer": {"lr": 1e-3, "warmup_steps": 1}, "export_dir": str(root / "export")},
        },
        "data": {
            "class_path": "datamodules.video_datamodule.VideoDataModule",
            "init_args": {"train_shards": str(shards), "val_shards": str(shards),
                          "view": {"class_path": "datamodules.views.KeyframeView",
                                   "init_args": {"image_size": VIEW_IMAGE}},
                          "batch_size": 4, "val_batch_size": 8, "samples_per_epoch": 16, "shuffle_buffer": 8,
                          "num_workers": 0},
        },
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def trained_run(prepared_shards, tokenizer_export, tmp_path_factory):
    """One 4-step fit (validation after steps 2 and 4) -> (run dir, the fitted stage)."""
    root = tmp_path_factory.mktemp("stage1_keyframe_detokenizer")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = run_lightning_cli(["fit", "--config", str(write_config(root, prepared_shards, tokenizer_export))])
    return root, cli.model


def some_images(n: int = 3, size: int = VIEW_IMAGE) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))


def test_fit_logs_and_checkpoints_only_what_trains(trained_run):
    root, stage = trained_run
    logged = scalars(root / "logs")
    assert {"train/loss", "train/tokens_per_image", "val/loss", "val/loss_other_codes", "val/psnr",
            "val/tokens_per_image"} <= set(logged)
    assert sorted(step for step, _ in logged["val/psnr"]) == [1, 3]
    assert all(torch.isfinite(torch.tensor(v)) for tag in ("train/loss", "val/loss") for _, v in logged[tag])
    assert all(0 < v < 60 for _, v in logged["val/psnr"])

    checkpoint = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 4
    state = checkpoint["state_dict"]
    assert state and all(k.startswith(TRAINED) for k in state), sorted(k for k in state if not k.startswith(TRAINED))[:5]
    assert any(k.startswith("detokenizer.feature_decoder.unet_attnpool.") for k in state)
    assert checkpoint[SOURCE_KEY]["directory"] and len(checkpoint[SOURCE_KEY]["fingerprint"]) == 64

    # Frozen parts are still the tokenizer export's; the condition heads moved.
    fresh = tiny_stage(Path(checkpoint[SOURCE_KEY]["directory"]))
    fresh.load_init_from(fresh.init_from)
    for name, tensor in fresh.state_dict().items():
        if name.startswith(TRAINED):
            continue
        assert torch.equal(stage.state_dict()[name], tensor), name
    head = "detokenizer.feature_decoder.unet_proj_1.weight"
    assert not torch.equal(stage.state_dict()[head], fresh.state_dict()[head])


def test_export_reloads_into_the_same_sampler(trained_run):
    root, stage = trained_run
    loaded = load_keyframe_detokenizer(root / "export")
    assert isinstance(build_latent_space(loaded.latent_space_spec), PixelSpace)
    assert loaded.config.image_size == UNET_IMAGE and loaded.config.latent_downsample == 1
    stage.eval()
    with torch.no_grad():
        ids = stage._ids(some_images())
        expected = stage.detokenizer.sample(stage.detokenizer.conditioning(ids), generator=torch.Generator().manual_seed(1))
        got = loaded.sample(loaded.conditioning(ids), generator=torch.Generator().manual_seed(1))
    assert torch.equal(expected, got)


def test_resume_rebuilds_the_frozen_parts_from_the_recorded_export(trained_run, prepared_shards, tokenizer_export,
                                                                   tmp_path):
    shutil.copytree(trained_run[0] / "checkpoints", tmp_path / "checkpoints")
    config = write_config(tmp_path, prepared_shards, init_from=None)  # what --model.init_from null gives
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = run_lightning_cli(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "6"])
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    steps = [step for step, _ in scalars(tmp_path / "logs")["train/loss"]]
    assert min(steps) >= 4 and max(steps) == 5
    assert cli.model.source["directory"] == str(tokenizer_export.resolve())


def test_resume_refuses_a_changed_tokenizer_export(trained_run, tmp_path):
    checkpoint = torch.load(trained_run[0] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    checkpoint[SOURCE_KEY]["fingerprint"] = "0" * 64
    with pytest.raises(ExportError, match="not the one this checkpoint was trained with"):
        tiny_stage(None).on_load_checkpoint(checkpoint)


def test_missing_or_incomplete_init_from_is_a_clear_error(tmp_path, tokenizer_export):
    with pytest.raises(FileNotFoundError, match="init_from directory .* does not exist: it must be the export"):
        tiny_stage(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    shutil.copy(tokenizer_export / "keyframe_tokenizer.json", tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="keyframe_feature_decoder.json"):
        check_tokenizer_export(tmp_path / "half")
    stage = tiny_stage(None)
    with pytest.raises(ValueError, match="needs model.init_args.init_from"):
        stage.configure_optimizers()


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> VaeLatentSpace:
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                        layers_per_block=1, scaling_factor=0.5)
    root = tmp_path_factory.mktemp("sdxl")
    vae.save_pretrained(root / "vae")
    return VaeLatentSpace(str(root))


def test_vae_latent_space_trains_but_stays_out_of_checkpoints_optimiser_and_export(tokenizer_export, tiny_vae, tmp_path):
    stage = tiny_stage(tokenizer_export, latent_space=tiny_vae, unet=KeyframeUNetConfig(**{**UNET, "in_channels": 4,
                                                                                            "out_channels": 4}))
    stage.load_init_from(stage.init_from)
    assert stage.detokenizer.config.latent_downsample == 2 and stage.detokenizer.config.latent_size == UNET_IMAGE // 2
    batch = {"image": some_images(2), "key": ["a", "b"], "clip_start": torch.zeros(2, dtype=torch.long)}
    stage.train()
    assert not stage.tokenizer.training and not stage.latent_space.vae.training
    loss = stage.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and stage.detokenizer.unet.net.conv_in.weight.grad is not None

    optimised = {id(p) for group in stage.parameter_groups() for p in group["params"]}
    named = dict(stage.named_parameters())
    assert {n for n, p in named.items() if id(p) in optimised} == {n for n in named if n.startswith(TRAINED)}
    checkpoint = {"state_dict": stage.state_dict()}
    stage.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all(k.startswith(TRAINED) for k in checkpoint["state_dict"])

    stage.eval()
    videos = stage.sample_videos(batch)["videos"]
    assert videos.dtype == torch.uint8 and videos.shape == (2, 1, 3, UNET_IMAGE, UNET_IMAGE)
    stage.export(tmp_path)
    loaded = load_keyframe_detokenizer(tmp_path)
    assert not [k for k in loaded.state_dict() if "vae" in k]
    space = build_latent_space(loaded.latent_space_spec)
    assert isinstance(space, VaeLatentSpace) and space.scaling_factor == 0.5


def test_mismatched_latent_channels_are_rejected():
    with pytest.raises(ValueError, match="unet.in_channels 4 != the latent space's channels 3"):
        tiny_stage(None, unet=KeyframeUNetConfig(**{**UNET, "in_channels": 4, "out_channels": 4}))


def test_psnr_of_identical_and_opposite_images():
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    assert (psnr(images, images) > 90).all()
    assert torch.allclose(psnr(torch.ones(1, 3, 4, 4), -torch.ones(1, 3, 4, 4)), torch.zeros(1))


@pytest.mark.parametrize("config", ["stage1_keyframe_detokenizer.yaml", "tiny/keyframe_detokenizer.yaml"])
def test_experiment_configs_fit_the_keyframe_tokenizer_configs(config):
    """The U-Net's condition widths are the feature decoder's, sizes divide, the batch divides over devices
    (tests/test_experiment_configs.py parses every config through the CLI)."""
    full = read_config(REPO / "experiments" / config)
    tokenizer_config = config.replace("keyframe_detokenizer", "keyframe_tokenizer")
    tokenizer = read_config(REPO / "experiments" / tokenizer_config)["model"]["init_args"]
    args = full["model"]["init_args"]
    space = args["latent_space"]
    downsample = 1 if space["class_path"].endswith("PixelSpace") else 8  # SDXL's VAE
    KeyframeDetokenizerConfig(unet=KeyframeUNetConfig(**args["unet"]), decoder=KeyframeFeatureDecoderConfig(**tokenizer["decoder"]),
                              diffusion=KeyframeDiffusionConfig(**args.get("diffusion", {})),
                              num_codes=tokenizer["tokenizer"]["num_codes"], code_dim=tokenizer["tokenizer"]["code_dim"],
                              image_size=args["image_size"], latent_downsample=downsample)
    assert args["init_from"] == tokenizer["export_dir"]
    trainer = full["trainer"]
    assert full["data"]["init_args"]["batch_size"] % (trainer.get("num_nodes", 1) * trainer["devices"]) == 0
