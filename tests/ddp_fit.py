"""Run a stage config as a 2-process CPU DDP ``fit`` and collect each rank's final state dict."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

RANK_STATE_CALLBACK = '''
import torch
from lightning.pytorch.callbacks import Callback


class RankState(Callback):
    """Saves each rank's full state dict (weights and buffers) when fit ends."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def on_fit_end(self, trainer, pl_module):
        torch.save(pl_module.state_dict(), f"{self.output_dir}/rank{trainer.global_rank}.pt")
'''

RANK_STATE = {"class_path": "rank_state.RankState"}


def rank_state_callback(tmp_path: Path) -> dict:
    """The callback entry to add to a config's ``trainer.callbacks`` (writes rank{r}.pt into ``tmp_path``)."""
    (tmp_path / "rank_state.py").write_text(RANK_STATE_CALLBACK)
    return {**RANK_STATE, "init_args": {"output_dir": str(tmp_path)}}


def fit_two_processes(config: Path, tmp_path: Path) -> list[dict[str, torch.Tensor]]:
    """``fit`` with 2 CPU DDP processes from ``tmp_path``; returns the ranks' state dicts, which must hold
    the same keys."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "videolavit", "fit", "--config", str(config), "--trainer.strategy", "ddp",
         "--trainer.devices", "2", "--trainer.accelerator", "cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys()
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks differ in {name}"
    return ranks
