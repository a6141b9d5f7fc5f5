"""``--ckpt_path last``: a clear one-line error when there is nothing to resume, a fallback (with a warning) to
the newest readable checkpoint when ``last.ckpt`` is empty or cut short, and a ``fit`` killed with SIGKILL
(after a checkpoint, and while writing one) that resumes its step count and finishes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.tensorboard_scalars import scalars
from tests.test_stage_motion_tokenizer import write_config

from videolavit.__main__ import main
from videolavit.cli import checkpoint_problem

REPO = Path(__file__).resolve().parents[1]


def user_error(argv: list[str], capsys) -> str:
    """The single ``error:`` line a user error prints; it must exit 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0]


def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


@pytest.fixture(scope="module")
def six_steps(prepared_shards, tmp_path_factory) -> Path:
    """A 6-step run: checkpoints after steps 3 and 6, and last.ckpt."""
    root = tmp_path_factory.mktemp("resume")
    assert main(["fit", "--config", str(write_config(root, prepared_shards))]) == 0
    return root


def copy_run(run: Path, to: Path, shards: Path) -> Path:
    shutil.copytree(run / "checkpoints", to / "checkpoints")
    return write_config(to, shards)


def test_resume_without_a_checkpoint_prints_one_line_and_exits_2(prepared_shards, tmp_path, capsys):
    line = user_error(["fit", "--config", str(write_config(tmp_path, prepared_shards)), "--ckpt_path", "last"], capsys)
    assert str(tmp_path / "checkpoints") in line and "drop --ckpt_path" in line and "Traceback" not in line


def test_checkpoint_problem_tells_whole_files_from_cut_ones(six_steps, tmp_path):
    last = six_steps / "checkpoints" / "last.ckpt"
    assert checkpoint_problem(last) is None
    data = last.read_bytes()
    for keep in (0, 100, len(data) // 2, len(data) - 10):
        cut = tmp_path / f"cut{keep}.ckpt"
        cut.write_bytes(data[:keep])
        assert checkpoint_problem(cut) is not None, keep
    assert checkpoint_problem(tmp_path / "cut0.ckpt") == "empty"
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    assert "not a complete torch checkpoint" in checkpoint_problem(tmp_path / "text.ckpt")
    (tmp_path / "sharded.ckpt").mkdir()
    assert "without .metadata" in checkpoint_problem(tmp_path / "sharded.ckpt")
    (tmp_path / "sharded.ckpt" / ".metadata").write_bytes(b"x")
    assert checkpoint_problem(tmp_path / "sharded.ckpt") is None


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_broken_last_ckpt_falls_back_to_the_newest_readable_checkpoint(six_steps, prepared_shards, tmp_path, damage):
    config = copy_run(six_steps, tmp_path, prepared_shards)
    checkpoints = tmp_path / "checkpoints"
    last = checkpoints / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2] if damage == "truncated" else b"")
    newest = max((p for p in checkpoints.glob("*.ckpt") if p.name != "last.ckpt"), key=step_of)
    assert step_of(newest) == 6

    with pytest.warns(UserWarning, match=f"last.ckpt is .*resuming from {newest}"):
        assert main(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "9"]) == 0
    assert step_of(last) == 9  # the resumed run wrote a good last.ckpt again
    steps = [step for step, _ in scalars(tmp_path / "logs")["train/loss"]]
    assert min(steps) == 6 and max(steps) == 8  # continued after step 6, not from 0 or from step 3


def test_no_readable_checkpoint_at_all_is_a_named_one_line_error(six_steps, prepared_shards, tmp_path, capsys):
    config = copy_run(six_steps, tmp_path, prepared_shards)
    for path in (tmp_path / "checkpoints").glob("*.ckpt"):
        path.write_bytes(path.read_bytes()[:1000])
    line = user_error(["fit", "--config", str(config), "--ckpt_path", "last"], capsys)
    assert "no readable checkpoint" in line and "last.ckpt (not a complete torch checkpoint" in line
    assert "step=3" in line and "step=6" in line and "Set --ckpt_path" in line


# ------------------------------------------------------------------------------------------- fault injection
def run_fit(config: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "videolavit", "fit", "--config", str(config), *extra],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def config_with(path: Path, out: Path, callbacks: list[dict] = (), plugins: list[dict] = ()) -> Path:
    config = yaml.safe_load(path.read_text())
    config["trainer"]["max_steps"] = 9
    config["trainer"]["callbacks"] += list(callbacks)
    if plugins:
        config["trainer"]["plugins"] = list(plugins)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


@pytest.mark.slow
def test_a_fit_killed_after_a_checkpoint_and_while_writing_one_resumes_and_finishes(prepared_shards, tmp_path):
    base = write_config(tmp_path, prepared_shards)
    starts = tmp_path / "starts.txt"
    record = {"class_path": "tests.fault_injection.RecordStart", "init_args": {"path": str(starts)}}
    checkpoints = tmp_path / "checkpoints"

    # 1. SIGKILL at step 4, after the checkpoint of step 3 was written.
    killed = config_with(base, tmp_path / "kill_at_step.yaml",
                         [record, {"class_path": "tests.fault_injection.KillAtStep", "init_args": {"step": 4}}])
    done = run_fit(killed, tmp_path)
    assert done.returncode == -9, done.stderr[-3000:]
    assert step_of(checkpoints / "last.ckpt") == 3

    # 2. Resumed, and SIGKILLed half-way through writing last.ckpt after step 6.
    mid_write = config_with(base, tmp_path / "kill_while_saving.yaml", [record],
                            [{"class_path": "tests.fault_injection.KillWhileSavingLast", "init_args": {"nth": 1}}])
    done = run_fit(mid_write, tmp_path, "--ckpt_path", "last")
    assert done.returncode == -9, done.stderr[-3000:]
    assert checkpoint_problem(checkpoints / "last.ckpt") is not None  # cut short
    assert sorted(step_of(p) for p in checkpoints.glob("*.ckpt") if p.name != "last.ckpt") == [3, 6]

    # 3. Resumed from the newest readable checkpoint (step 6), with a warning, and finished.
    done = run_fit(config_with(base, tmp_path / "finish.yaml", [record]), tmp_path, "--ckpt_path", "last")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "last.ckpt is not a complete torch checkpoint" in done.stderr and "step=6" in done.stderr
    assert [int(line) for line in starts.read_text().split()] == [0, 3, 6]  # each run continued the count
    assert step_of(checkpoints / "last.ckpt") == 9
    assert (tmp_path / "export" / "motion_tokenizer.safetensors").is_file()
