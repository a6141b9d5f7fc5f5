"""Exports and checkpoints that are safe to load and to share: hostile export JSON never runs code (only the
registered model and config classes are built), corrupt files are named errors, a NaN model is never exported,
files get normal permissions, and failed writes leave nothing behind (not in $TMPDIR, not next to the file)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import sys
import tempfile
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import save_file

from tests.test_motion_tokenizer import tiny
from videolavit.models.eva_vit import EvaViTConfig
from videolavit.models.export import (
    EXPORTABLE,
    ExportError,
    NonFiniteExportError,
    UnregisteredClassError,
    exportable_classes,
    load_export,
    read_export,
    save_export,
)
from videolavit.models.keyframe_tokenizer import KeyframeTokenizer, KeyframeTokenizerConfig
from videolavit.models.keyframe_tokenizer_export import init_backbone, load_keyframe_tokenizer, save_keyframe_tokenizer
from videolavit.models.latent_space import build_latent_space
from videolavit.models.motion_tokenizer import MotionTokenizer
from videolavit.models.video_detokenizer import load_video_detokenizer

MOTION = "videolavit.models.motion_tokenizer.MotionTokenizer"


def motion_export(directory: Path) -> MotionTokenizer:
    torch.manual_seed(0)
    model = MotionTokenizer(tiny("paper64")).eval()
    save_export(model, directory, "motion_tokenizer", model.config)
    return model


def hostile_records(marker: Path) -> dict[str, dict]:
    """Export JSONs that, loaded by importing what they name, would create ``marker``."""
    touch = f"touch {marker}"
    return {
        "popen_shell": {"class_path": "subprocess.Popen", "config": {"args": touch, "shell": True}},
        "os_system": {"class_path": "os.system", "config": {"command": touch}},
        "builtins_eval": {"class_path": "builtins.eval", "config": {"source": f"open({str(marker)!r}, 'w')"}},
        "registered_model_popen_config": {"class_path": MOTION, "config_class": "subprocess.Popen",
                                          "config": {"args": touch, "shell": True}},
        "registered_model_eval_config": {"class_path": MOTION, "config_class": "builtins.eval",
                                         "config": {"source": f"open({str(marker)!r}, 'w')"}},
        "registered_model_other_config": {"class_path": MOTION,
                                          "config_class": "videolavit.models.eva_vit.EvaViTConfig",
                                          "config": dataclasses.asdict(EvaViTConfig())},
        "class_path_not_a_string": {"class_path": ["subprocess", "Popen"], "config": {}},
    }


HOSTILE = list(hostile_records(Path("m")))


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_export_json_is_a_named_error_and_runs_nothing(tmp_path, case):
    motion_export(tmp_path)
    marker = tmp_path / "pwned"
    record = {"format_version": 1, **hostile_records(marker)[case]}
    (tmp_path / "motion_tokenizer.json").write_text(json.dumps(record))
    with pytest.raises(UnregisteredClassError) as info:
        load_export(tmp_path, "motion_tokenizer")
    message = str(info.value)
    named = record["config_class"] if "config_class" in record else record["class_path"]
    assert repr(named) in message
    assert MOTION in message  # what is allowed
    assert not marker.exists()


def test_every_registered_class_is_a_module_with_a_config_dataclass():
    for model_path, config_path in EXPORTABLE.items():
        model_cls, config_cls = exportable_classes(model_path, config_path, "test")
        assert issubclass(model_cls, torch.nn.Module) and dataclasses.is_dataclass(config_cls)
        assert f"{model_cls.__module__}.{model_cls.__qualname__}" == model_path


def test_saving_an_unregistered_model_is_refused(tmp_path):
    with pytest.raises(UnregisteredClassError, match="torch.nn.modules.linear.Linear"):
        save_export(torch.nn.Linear(2, 2), tmp_path, "linear", {"in_features": 2, "out_features": 2})
    model = MotionTokenizer(tiny("paper64"))
    with pytest.raises(UnregisteredClassError, match="EvaViTConfig"):
        save_export(model, tmp_path, "motion_tokenizer", EvaViTConfig())
    assert list(tmp_path.iterdir()) == []


def test_an_export_holding_another_registered_class_is_refused_where_one_kind_is_expected(tmp_path):
    motion_export(tmp_path)
    record = json.loads((tmp_path / "motion_tokenizer.json").read_text())
    record["extra"] = {"spec": {"latent_space": {"class_path": "videolavit.models.latent_space.PixelSpace",
                                                 "init_args": {}},
                                "frame_size": [16, 16], "num_frames": 24, "motion_grid": [8, 8], "motion_scale": 10.0}}
    (tmp_path / "video_detokenizer.json").write_text(json.dumps(record))
    shutil.copy(tmp_path / "motion_tokenizer.safetensors", tmp_path / "video_detokenizer.safetensors")
    with pytest.raises(ExportError, match="holds a MotionTokenizer, not a VideoDetokenizer"):
        load_video_detokenizer(tmp_path)


def test_keyframe_tokenizer_export_naming_another_class_is_refused(tmp_path):
    config = KeyframeTokenizerConfig(
        vit=EvaViTConfig(image_size=56, patch_size=14, width=32, depth=1, num_heads=2, mlp_dim=64, embed_dim=32),
        merger_depth=1, merger_heads=2, merger_mlp_dim=64, num_codes=16, code_dim=8, llm_dim=32)
    model = KeyframeTokenizer(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        save_keyframe_tokenizer(model, tmp_path, init_backbone(model, None, 0))
        assert isinstance(load_keyframe_tokenizer(tmp_path), KeyframeTokenizer)
    marker = tmp_path / "pwned"
    record = json.loads((tmp_path / "keyframe_tokenizer.json").read_text())
    record.update(class_path="subprocess.Popen", config_class=None)
    (tmp_path / "keyframe_tokenizer.json").write_text(json.dumps(record))
    with pytest.raises(UnregisteredClassError, match="'subprocess.Popen'"):
        load_keyframe_tokenizer(tmp_path)
    assert not marker.exists()


def test_a_latent_space_record_never_imports_the_module_it_names(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "s17_side_effect.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Space:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="not a videolavit LatentSpace"):
        build_latent_space({"class_path": "s17_side_effect.Space", "init_args": {}})
    with pytest.raises(ValueError, match="not a videolavit LatentSpace"):
        build_latent_space({"class_path": "subprocess.Popen", "init_args": {"args": f"touch {marker}", "shell": True}})
    assert not marker.exists() and "s17_side_effect" not in sys.modules


def test_exports_as_todays_code_wrote_them_still_load(tmp_path):
    torch.manual_seed(0)
    model = MotionTokenizer(tiny("paper64")).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "motion_tokenizer.safetensors"))
    config = dataclasses.asdict(model.config)
    (tmp_path / "motion_tokenizer.json").write_text(json.dumps({
        "format_version": 1, "class_path": MOTION, "config": config,
        "config_class": "videolavit.models.motion_tokenizer.MotionTokenizerConfig"}, indent=2, sort_keys=True))
    restored = load_export(tmp_path, "motion_tokenizer").eval()
    assert isinstance(restored, MotionTokenizer) and restored.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value)
    record = json.loads((tmp_path / "motion_tokenizer.json").read_text())
    del record["config_class"]  # a record without one takes the registered config class
    (tmp_path / "motion_tokenizer.json").write_text(json.dumps(record))
    assert load_export(tmp_path, "motion_tokenizer").config == model.config


# ---- corrupt files ---------------------------------------------------------------------------------

def test_truncated_or_corrupt_files_are_export_errors_naming_the_file(tmp_path):
    motion_export(tmp_path)
    weights, record = tmp_path / "motion_tokenizer.safetensors", tmp_path / "motion_tokenizer.json"
    data = weights.read_bytes()
    for broken in (data[: len(data) // 2], data[:5], b""):
        weights.write_bytes(broken)
        with pytest.raises(ExportError, match="truncated or not a safetensors file") as info:
            load_export(tmp_path, "motion_tokenizer")
        assert str(weights) in str(info.value)
    weights.write_bytes(data)
    for text in ('{"class_path": ', "[1, 2]", '{"config": 3}'):
        record.write_text(text)
        with pytest.raises(ExportError) as info:
            read_export(tmp_path, "motion_tokenizer")
        assert str(record) in str(info.value)
    record.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ExportError, match="cannot read"):
        read_export(tmp_path, "motion_tokenizer")


def test_a_config_that_does_not_fit_its_class_is_an_export_error(tmp_path):
    motion_export(tmp_path)
    record = json.loads((tmp_path / "motion_tokenizer.json").read_text())
    record["config"]["no_such_field"] = 1
    (tmp_path / "motion_tokenizer.json").write_text(json.dumps(record))
    with pytest.raises(ExportError, match="no_such_field"):
        load_export(tmp_path, "motion_tokenizer")


# ---- non-finite tensors ------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_model_is_never_exported_and_the_old_export_stays(tmp_path, bad):
    model = motion_export(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    name, param = next(iter(model.named_parameters()))
    with torch.no_grad():
        param.view(-1)[0] = bad
    with pytest.raises(NonFiniteExportError, match=name):
        save_export(model, tmp_path, "motion_tokenizer", model.config)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    with pytest.raises(NonFiniteExportError):
        save_export(model, tmp_path / "fresh", "motion_tokenizer", model.config)
    assert not (tmp_path / "fresh").exists() or list((tmp_path / "fresh").iterdir()) == []


# ---- permissions and temporary files -------------------------------------------------------------------

@pytest.fixture
def umask():
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.fixture
def empty_tmpdir(tmp_path, monkeypatch) -> Path:
    """$TMPDIR (and Python's tempfile) pointed at an empty directory, to see what a write leaves there."""
    directory = tmp_path / "tmpdir"
    directory.mkdir()
    monkeypatch.setenv("TMPDIR", str(directory))
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_exports_get_the_umask_permissions(tmp_path, umask):
    motion_export(tmp_path / "shared")
    assert {p.name: oct(mode(p)) for p in (tmp_path / "shared").iterdir()} == {
        "motion_tokenizer.json": "0o644", "motion_tokenizer.safetensors": "0o644"}
    umask(0o077)
    motion_export(tmp_path / "private")
    assert {oct(mode(p)) for p in (tmp_path / "private").iterdir()} == {"0o600"}


def fail_renames(monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer dies just before its file would take the destination's place."""
    def refuse(*args, **kwargs):
        raise OSError("simulated crash before the rename")
    monkeypatch.setattr(os, "replace", refuse)
    monkeypatch.setattr(os, "rename", refuse)
    monkeypatch.setattr(shutil, "move", refuse)


def test_a_failed_export_write_leaves_the_old_export_and_no_partial_files(tmp_path, empty_tmpdir, monkeypatch):
    model = motion_export(tmp_path / "export")
    before = {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir()}
    with monkeypatch.context() as patch, pytest.raises(OSError, match="simulated crash"):
        fail_renames(patch)
        save_export(model, tmp_path / "export", "motion_tokenizer", model.config)
    assert {p.name: p.read_bytes() for p in (tmp_path / "export").iterdir()} == before
    assert list(empty_tmpdir.iterdir()) == []


class TinyModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TinyData(pl.LightningDataModule):
    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=2)


def test_checkpoints_are_written_next_to_their_file_and_failed_writes_leave_nothing(tmp_path, empty_tmpdir, umask,
                                                                                     monkeypatch):
    from callbacks.atomic_checkpoint_io import AtomicCheckpointIO
    from videolavit.cli import run_lightning_cli

    checkpoints = tmp_path / "checkpoints"
    cli = run_lightning_cli([
        "fit", "--model", f"{__name__}.TinyModule", "--data", f"{__name__}.TinyData",
        "--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={checkpoints}",
        "--trainer.callbacks.save_last=true"])
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    written = sorted(p.name for p in checkpoints.iterdir())
    assert "last.ckpt" in written and not [n for n in written if n.startswith(".")]
    assert {oct(mode(p)) for p in checkpoints.iterdir()} == {"0o644"}
    last = (checkpoints / "last.ckpt").read_bytes()

    with monkeypatch.context() as patch, pytest.raises(OSError, match="simulated crash"):
        fail_renames(patch)
        cli.trainer.save_checkpoint(checkpoints / "last.ckpt")
    assert sorted(p.name for p in checkpoints.iterdir()) == written
    assert (checkpoints / "last.ckpt").read_bytes() == last
    assert list(empty_tmpdir.iterdir()) == []
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 2
