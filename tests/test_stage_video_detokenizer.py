"""Stage 1b (video detokenizer) through the CLI users run: the frozen motion tokenizer comes from init_from and
stays out of checkpoints and the optimiser, validation logs loss and direction agreement, the export rebuilds
a model that samples identically, resume reloads the tokenizer, and wrong data is named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.stage_configs import stage_conf, write_stage_config
from tests.tensorboard_scalars import scalars

from datamodules.video_datamodule import VideoDataModule
from datamodules.views import VideoView
from stages.video_detokenizer import VideoDetokenizerStage
from videolavit.video.motion_direction import motion_field_direction
from videolavit.__main__ import main
from videolavit.models.export import ExportError, save_export
from videolavit.models.motion_condition_encoder import MotionConditionEncoderConfig
from videolavit.models.motion_tokenizer import MotionTokenizer, MotionTokenizerConfig
from videolavit.models.video_detokenizer import (
    EXPORT_NAME,
    VideoDetokenizerConfig,
    load_video_detokenizer,
    read_video_detokenizer_spec,
)
from videolavit.models.video_unet import VideoUNetConfig

REPO = Path(__file__).resolve().parents[1]
GRID, FRAME = (8, 8), (16, 16)
TOKENIZER = dict(num_frames=24, height=8, width=8, dim=16, num_heads=2, mlp_ratio=2.0, blocks_per_stage=[1, 1, 1, 1],
                 stage_factors=[[1, 2, 2], [2, 1, 1], [3, 1, 1], [1, 1, 1]], num_codes=32, code_dim=8)
DETOKENIZER = stage_conf("video_detokenizer")["model"]["init_args"]["detokenizer"]  # tests/conf/video_detokenizer.yaml
VAL_SCALARS = {"val/loss", "val/loss_other_motion", "val/direction_agreement", "val/direction_agreement_input"}




@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A (randomly initialised) tiny motion tokenizer export, as stage 1a writes it."""
    directory = tmp_path_factory.mktemp("tokenizer_export")
    torch.manual_seed(0)
    config = MotionTokenizerConfig(**TOKENIZER)
    save_export(MotionTokenizer(config), directory, "motion_tokenizer", config)
    return directory


def write_config(root: Path, shards: Path, tokenizer: Path | None) -> Path:
    return write_stage_config("video_detokenizer", root, shards,
                              {"model": {"init_args": {"init_from": str(tokenizer) if tokenizer else None}}})


def new_stage(**overrides) -> VideoDetokenizerStage:
    torch.manual_seed(0)
    return VideoDetokenizerStage(detokenizer=VideoDetokenizerConfig(**DETOKENIZER),
                                 **{"sample_steps": 2, **overrides})


def val_batch(shards: Path, size: int = 2) -> dict:
    dm = VideoDataModule(val_shards=str(shards), view=VideoView(frame_size=FRAME, grid=GRID, scale=10.0),
                         batch_size=size, num_workers=0)
    return next(iter(dm.val_dataloader()))


@pytest.fixture(scope="module")
def trained_run(prepared_shards, tokenizer_dir, tmp_path_factory) -> Path:
    """A 2-step fit with one validation, shared by the tests that read its outputs."""
    root = tmp_path_factory.mktemp("stage1b")
    assert main(["fit", "--config", str(write_config(root, prepared_shards, tokenizer_dir))]) == 0
    return root


def test_fit_logs_and_checkpoints_only_what_it_trains(trained_run, tokenizer_dir):
    logged = scalars(trained_run / "logs")
    assert "train/loss" in logged and VAL_SCALARS <= set(logged), sorted(logged)
    for tag in ("val/direction_agreement", "val/direction_agreement_input"):
        assert all(0.0 <= v <= 1.0 for _, v in logged[tag])

    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2
    keys = set(checkpoint["state_dict"])
    assert keys and all(k.startswith("model.") for k in keys), sorted(k for k in keys if not k.startswith("model."))
    assert not any(k.startswith(("motion_tokenizer.", "latent_space.")) for k in keys)
    assert checkpoint["motion_tokenizer_dir"] == str(tokenizer_dir.resolve())
    optimised = sum(len(group["params"]) for group in checkpoint["optimizer_states"][0]["param_groups"])
    assert optimised == len(list(new_stage().model.parameters()))  # the tokenizer is not in the optimiser


def test_init_from_attaches_the_frozen_motion_tokenizer(tokenizer_dir):
    stage = new_stage(init_from=str(tokenizer_dir))
    assert stage.motion_tokenizer is None
    stage.load_init_from(str(tokenizer_dir))
    torch.manual_seed(0)
    expected = MotionTokenizer(MotionTokenizerConfig(**TOKENIZER)).state_dict()
    for name, tensor in stage.motion_tokenizer.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert not any(p.requires_grad for p in stage.motion_tokenizer.parameters())
    grouped = {id(p) for group in stage.parameter_groups() for p in group["params"]}
    assert grouped == {id(p) for p in stage.model.parameters()}
    assert not stage.train().motion_tokenizer.training  # stays in eval mode (its codebook never moves)


def test_export_rebuilds_a_model_that_samples_like_the_stage(trained_run, prepared_shards, tokenizer_dir):
    model, latent_space = load_video_detokenizer(trained_run / "export")
    assert latent_space["class_path"] == "videolavit.models.latent_space.PixelSpace"
    spec = read_video_detokenizer_spec(trained_run / "export")
    assert (spec.frame_size, spec.num_frames, spec.motion_grid, spec.motion_scale) == (FRAME, 24, GRID, 10.0)

    stage = new_stage()
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    stage.load_state_dict(checkpoint["state_dict"], strict=True)
    stage.load_init_from(str(tokenizer_dir))
    stage.eval()
    for name, tensor in stage.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name

    batch = val_batch(prepared_shards)
    videos = stage.sample_videos(batch)["videos"]
    assert videos.dtype == torch.uint8 and videos.shape == (2, 24, 3, *FRAME)
    motion = stage.condition_motion(batch["motion"])
    with torch.no_grad():
        g = torch.Generator().manual_seed(stage.val_seed)
        cond = model.conditioning(batch["keyframe"].float() / 127.5 - 1, motion, generator=g)
        latents = model.sample(cond, 24, num_steps=stage.sample_steps, guidance=stage.sample_guidance, generator=g)
    assert torch.equal(stage.reconstruct(batch["keyframe"], motion), videos)
    assert torch.equal(((latents.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8), videos)


def test_resume_reloads_the_tokenizer_from_the_recorded_directory(trained_run, prepared_shards, tokenizer_dir,
                                                                   tmp_path):
    shutil.copytree(trained_run / "checkpoints", tmp_path / "checkpoints")
    config = write_config(tmp_path, prepared_shards, tokenizer_dir)
    assert main(["fit", "--config", str(config), "--ckpt_path", "last", "--model.init_args.init_from", "null",
                 "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0"]) == 0
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert (tmp_path / "export" / f"{EXPORT_NAME}.safetensors").is_file()


def test_tokenizer_conditioning_without_init_from_is_an_error(prepared_shards, tmp_path):
    config = write_config(tmp_path, prepared_shards, None)
    with pytest.raises(ValueError, match="set init_from to the directory holding the stage-1a motion_tokenizer"):
        main(["fit", "--config", str(config)])


def test_view_that_does_not_match_the_tokenizer_is_named(tokenizer_dir):
    stage = new_stage()
    stage.load_init_from(str(tokenizer_dir))
    with pytest.raises(ValueError, match=r"set data.view.init_args.grid to \[8, 8\]"):
        stage.check_view(VideoView(frame_size=FRAME, grid=(16, 16), scale=10.0))
    with pytest.raises(ValueError, match="reads fields at scale 10.0, the video view delivers scale 1.0"):
        stage.check_view(VideoView(frame_size=FRAME, grid=GRID, scale=1.0))
    with pytest.raises(ValueError, match="trains on the `video` view"):
        stage.check_view(object())
    stage.check_view(VideoView(frame_size=FRAME, grid=GRID, scale=10.0))
    assert stage.data_spec["motion_grid"] == GRID


def test_raw_motion_source_conditions_on_the_field_itself(prepared_shards):
    stage = new_stage(motion_source="raw")
    batch = val_batch(prepared_shards)
    assert torch.equal(stage.condition_motion(batch["motion"]), batch["motion"])
    assert motion_field_direction(torch.zeros(2, 3, 4, 4)) is None
    right = torch.zeros(2, 3, 4, 4)
    right[0, :, 1, 1], right[1, :, 2, 2] = 2.0, -0.5
    assert motion_field_direction(right) == "right"
    assert motion_field_direction(-right) == "left"
    assert motion_field_direction(right.flip(0)) == "down"  # x and y swapped
    assert motion_field_direction(-right.flip(0)) == "up"


def test_weights_from_loads_a_previous_export_and_rejects_another_model(trained_run):
    stage = new_stage()
    stage._load_weights_from(str(trained_run / "export"))
    model, _ = load_video_detokenizer(trained_run / "export")
    for name, tensor in model.state_dict().items():
        assert torch.equal(stage.model.state_dict()[name], tensor), name
    other = VideoDetokenizerStage(detokenizer=VideoDetokenizerConfig(
        unet=VideoUNetConfig(**{**DETOKENIZER["unet"], "cross_attention_dim": 32}),
        motion_encoder=MotionConditionEncoderConfig(**{**DETOKENIZER["motion_encoder"], "out_dim": 32}),
        scaling="edm"))
    with pytest.raises(ExportError, match="does not fit this detokenizer"):
        other._load_weights_from(str(trained_run / "export"))
    with pytest.raises(ValueError, match="not both"):
        new_stage(unet_init="/svd", weights_from=str(trained_run / "export"))


def print_config(path: Path, capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
    return yaml.safe_load(capsys.readouterr().out)


def test_configs_agree_with_their_tokenizers_and_with_each_other(capsys):
    tiny = print_config(REPO / "experiments/tiny/video_detokenizer.yaml", capsys)
    tiny_tokenizer = print_config(REPO / "experiments/tiny/motion_tokenizer.yaml", capsys)
    view = tiny["data"]["init_args"]["view"]["init_args"]
    tokenizer = tiny_tokenizer["model"]["init_args"]["tokenizer"]
    assert view["grid"] == [tokenizer["height"], tokenizer["width"]] and view["scale"] == 10.0
    detokenizer = VideoDetokenizerConfig(**tiny["model"]["init_args"]["detokenizer"])
    assert detokenizer.unet.latent_channels == 3  # pixels

    first = print_config(REPO / "experiments/stage1_video_detokenizer.yaml", capsys)
    second = print_config(REPO / "experiments/stage1_video_detokenizer_1024x576.yaml", capsys)
    assert second["model"]["init_args"]["weights_from"] == first["model"]["init_args"]["export_dir"]
    assert first["model"]["init_args"]["detokenizer"] == second["model"]["init_args"]["detokenizer"]
    for config, size in ((first, [384, 384]), (second, [576, 1024])):
        assert config["data"]["init_args"]["view"]["init_args"]["frame_size"] == size
        trainer = config["trainer"]
        assert config["data"]["init_args"]["batch_size"] == 128
        assert 128 % (trainer["num_nodes"] * trainer["devices"]) == 0
