"""Stage 1a through the CLI users run: fit logs, checkpoints and exports; resume continues the run;
2-process DDP keeps the ranks (and the EMA codebook) in sync; predict dumps every clip's token ids."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.ddp_fit import fit_two_processes, rank_state_callback
from tests.stage_configs import stage_conf, write_stage_config
from tests.tensorboard_scalars import scalars

from videolavit.token_dump import TokenDumpError, read_token_dump, read_token_manifest
from datamodules.video_datamodule import VideoDataModule
from datamodules.views import MotionView
from stages.motion_tokenizer import EXPORT_NAME, MotionTokenizerStage
from videolavit.__main__ import main
from videolavit.models.export import load_export
from videolavit.models.motion_tokenizer import MotionTokenizerConfig

REPO = Path(__file__).resolve().parents[1]
GRID = (8, 8)  # the 96x96 test corpus has a 6x6 macroblock grid; the view resizes it
TOKENIZER = stage_conf("motion_tokenizer")["model"]["init_args"]["tokenizer"]  # tests/conf/motion_tokenizer.yaml
NUM_TOKENS = MotionTokenizerConfig(**TOKENIZER).num_tokens  # 4x4x4
VAL_CLIPS = 16  # 8 videos x 2 clips
VAL_SCALARS = {"val/recon_mse", "val/zero_mse", "val/recon_ratio", "val/codebook_usage", "val/perplexity"}




def write_config(root: Path, shards: Path, batch_size: int = 4, callbacks: list[dict] | None = None) -> Path:
    """A complete tiny stage config under ``root`` (checkpoints, logs, export all inside it)."""
    return write_stage_config("motion_tokenizer", root, shards, {"data": {"init_args": {"batch_size": batch_size}}},
                              callbacks=callbacks)


def val_clips(shards: Path) -> list[dict]:
    dm = VideoDataModule(val_shards=str(shards), view=MotionView(grid=GRID), batch_size=8, num_workers=0)
    return list(dm.val_dataloader())


def stage_from_checkpoint(path: Path) -> MotionTokenizerStage:
    stage = MotionTokenizerStage(tokenizer=MotionTokenizerConfig(**TOKENIZER))
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    stage.load_state_dict(checkpoint["state_dict"], strict=True)
    return stage.eval()


@pytest.fixture(scope="module")
def trained_run(prepared_shards, tmp_path_factory) -> Path:
    """One 6-step fit (validation at steps 3 and 6), shared by the tests that read its outputs."""
    root = tmp_path_factory.mktemp("stage1a")
    assert main(["fit", "--config", str(write_config(root, prepared_shards))]) == 0
    return root


def test_fit_logs_metrics_checkpoints_and_an_export_that_encodes_like_the_stage(trained_run, prepared_shards):
    logged = scalars(trained_run / "logs")
    assert "train/loss" in logged and VAL_SCALARS <= set(logged), sorted(logged)
    assert sorted(step for step, _ in logged["val/recon_ratio"]) == [2, 5]  # after steps 3 and 6 (0-based)
    assert all(torch.isfinite(torch.tensor(v)) for _, v in logged["train/loss"])

    last = trained_run / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 6
    assert (trained_run / "export" / f"{EXPORT_NAME}.safetensors").is_file()
    assert (trained_run / "export" / f"{EXPORT_NAME}.json").is_file()

    exported = load_export(trained_run / "export", EXPORT_NAME).eval()
    stage = stage_from_checkpoint(last)
    for name, tensor in stage.model.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name
    assert int(exported.quantize.num_updates) == 6  # the EMA codebook trained and was exported with it
    motion = torch.cat([batch["motion"] for batch in val_clips(prepared_shards)])
    with torch.inference_mode():
        ids = exported.encode(motion)
        assert torch.equal(ids, stage.model.encode(motion))
    assert ids.shape == (VAL_CLIPS, NUM_TOKENS)


def test_resume_continues_the_step_count(trained_run, prepared_shards, tmp_path):
    # a run directory moved elsewhere resumes too, and keeps writing last.ckpt (no last-v1.ckpt)
    shutil.copytree(trained_run / "checkpoints", tmp_path / "checkpoints")
    config = write_config(tmp_path, prepared_shards)
    assert main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "9"]) == 0

    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("last*")) == ["last.ckpt"]
    steps = [step for step, _ in scalars(tmp_path / "logs")["train/loss"]]
    assert min(steps) >= 6 and max(steps) == 8  # the resumed run logs steps 6..8 only
    assert int(load_export(tmp_path / "export", EXPORT_NAME).quantize.num_updates) == 9


def user_error(argv: list[str], capsys) -> str:
    """The one line a user error prints on stderr (and exits 2 with)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0]


def test_resume_from_last_without_a_checkpoint_is_an_error(prepared_shards, tmp_path, capsys):
    config = write_config(tmp_path, prepared_shards)
    assert "no last" in user_error(["fit", "--config", str(config), "--ckpt_path", "last"], capsys)


@pytest.mark.parametrize("weights", ["checkpoint", "export"])
def test_predict_dumps_every_val_clip_once(trained_run, prepared_shards, tmp_path, weights):
    out = tmp_path / "tokens"
    config = trained_run / "config.yaml"
    source = (["--ckpt_path", "last"] if weights == "checkpoint"
              else ["--model.init_args.init_from", str(trained_run / "export")])
    assert main(["predict", "--config", str(config), *source, "--data.init_args.num_workers", "2",
                 "--trainer.callbacks+=callbacks.token_dump.TokenDumpWriter",
                 f"--trainer.callbacks.output_dir={out}"]) == 0

    manifest = read_token_manifest(out)
    assert manifest["num_tokens"] == NUM_TOKENS and manifest["num_codes"] == TOKENIZER["num_codes"]
    lines = sum(len((out / name).read_text().splitlines()) for name in manifest["files"])
    tokens = read_token_dump(out)
    assert lines == len(tokens) == VAL_CLIPS  # every clip once, none twice

    exported = load_export(trained_run / "export", EXPORT_NAME).eval()
    for batch in val_clips(prepared_shards):
        with torch.inference_mode():
            expected = exported.encode(batch["motion"]).tolist()
        for key, start, ids in zip(batch["key"], batch["clip_start"].tolist(), expected):
            assert tokens[(key, start)] == ids
    assert all(len(ids) == NUM_TOKENS and 0 <= min(ids) and max(ids) < TOKENIZER["num_codes"]
               for ids in tokens.values())


@pytest.mark.parametrize("extra, message", [
    (["--trainer.callbacks+=callbacks.token_dump.TokenDumpWriter", "--trainer.callbacks.output_dir=OUT"],
     "needs trained weights"),
    (["--ckpt_path", "last"], "prediction writer"),
])
def test_predict_refuses_to_waste_its_work(trained_run, tmp_path, extra, message, capsys):
    extra = [arg.replace("OUT", str(tmp_path)) for arg in extra]
    assert message in user_error(["predict", "--config", str(trained_run / "config.yaml"), *extra], capsys)


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_in_sync(prepared_shards, tmp_path):
    config = write_config(tmp_path, prepared_shards, callbacks=[rank_state_callback(tmp_path)])
    ranks = fit_two_processes(config, tmp_path)
    assert int(ranks[0]["model.quantize.num_updates"]) == 6  # one EMA step per optimizer step, both ranks
    exported = load_export(tmp_path / "export", EXPORT_NAME)
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, ranks[0][f"model.{name}"]), name
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert VAL_SCALARS <= set(scalars(tmp_path / "logs"))


@pytest.mark.slow
def test_two_process_predict_dumps_each_clip_once(trained_run, tmp_path):
    out = tmp_path / "tokens"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "videolavit", "predict", "--config", str(trained_run / "config.yaml"),
         "--ckpt_path", "last", "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
         "--trainer.callbacks+=callbacks.token_dump.TokenDumpWriter", f"--trainer.callbacks.output_dir={out}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    manifest = read_token_manifest(out)
    per_rank = [len((out / name).read_text().splitlines()) for name in manifest["files"]]
    assert len(per_rank) == 2 and all(per_rank)  # both ranks wrote their share
    tokens = read_token_dump(out)
    assert sum(per_rank) == len(tokens) == VAL_CLIPS


def test_token_dump_reader_refuses_incomplete_or_contradictory_dumps(tmp_path):
    def dump(lines: list[dict], clips: int) -> Path:
        out = tmp_path / f"dump{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        (out / "motion_tokens.rank00000.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        (out / "motion_tokens.json").write_text(json.dumps(
            {"format": "videolavit-token-dump", "files": ["motion_tokens.rank00000.jsonl"], "clips": clips}))
        return out

    a, b = {"key": "v0", "clip_start": 0, "motion_ids": [1, 2]}, {"key": "v0", "clip_start": 12, "motion_ids": [3, 4]}
    assert read_token_dump(dump([a, b], 2)) == {("v0", 0): [1, 2], ("v0", 12): [3, 4]}
    assert read_token_dump(dump([a, b, a], 3)) == {("v0", 0): [1, 2], ("v0", 12): [3, 4]}  # same clip, same ids
    with pytest.raises(TokenDumpError, match="different ids"):
        read_token_dump(dump([a, {**a, "motion_ids": [9, 9]}], 2))
    with pytest.raises(TokenDumpError, match="holds 1 clips, its manifest says 2"):
        read_token_dump(dump([a], 2))  # a rank file cut short
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(TokenDumpError, match="no finished 'motion' token dump"):
        read_token_dump(tmp_path / "unfinished")
