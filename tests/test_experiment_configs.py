"""Every experiment config parses through the CLI users run (``fit --config X --print_config``), and the
stage 1a configs describe the tokenizer they claim: token count, input grid = data view grid, and a
global batch that divides over their devices."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.effective_config_snapshots import experiment_configs, snapshot_path
from videolavit.__main__ import main
from videolavit.models.motion_tokenizer import MotionTokenizerConfig

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
CONFIGS = experiment_configs()
MOTION_TOKENS = {  # full-scale stage 1a configs and the token count each must give
    "stage1_motion_tokenizer.yaml": 135,
    "stage1_motion_tokenizer_paper256.yaml": 256,
    "stage1_motion_tokenizer_paper64.yaml": 64,
}


def print_config(path: Path, capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err[-2000:]
    return yaml.safe_load(capsys.readouterr().out)


def test_the_full_scale_stage_1a_configs_exist():
    assert set(MOTION_TOKENS) <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_config_parses(path, capsys):
    config = print_config(path, capsys)
    assert {"trainer", "model", "data"} <= set(config)
    # what the run gets, setting for setting, as recorded (tests/effective_config_snapshots.py rewrites them)
    assert config == yaml.safe_load(snapshot_path(path).read_text())
    init = config["model"]["init_args"]
    if config["model"]["class_path"] != "stages.motion_tokenizer.MotionTokenizerStage":
        return
    tokenizer = MotionTokenizerConfig(**init["tokenizer"])
    view = config["data"]["init_args"]["view"]["init_args"]
    assert tuple(view["grid"]) == (tokenizer.height, tokenizer.width)
    assert view["clip_frames"] == tokenizer.num_frames
    if path.name in MOTION_TOKENS:
        assert tokenizer.num_tokens == MOTION_TOKENS[path.name]
        trainer = config["trainer"]
        assert config["data"]["init_args"]["batch_size"] % (trainer["num_nodes"] * trainer["devices"]) == 0
        checkpoint = next(c for c in trainer["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))
        assert checkpoint["init_args"]["dirpath"] and checkpoint["init_args"]["save_last"]
        # the run ends on a checkpoint, so last.ckpt holds the final step
        assert trainer["max_steps"] % checkpoint["init_args"]["every_n_train_steps"] == 0
