"""What every training stage shares: AdamW with linear warm-up + cosine decay, ``init_from``, frozen
sub-modules kept out of checkpoints, and an export written at the end of ``fit``.

``init_from`` (weights only, from a previous stage's export) is applied once, at the start of a new
run; resuming the same stage is Lightning's ``--ckpt_path`` and the CLI refuses both together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

NO_DECAY_NAMES = ("bias", "pos_embed", "temp_pos", "embedding", "query_embed", "cls_token", "positional_embedding")


@dataclass
class OptimizerConfig:
    """AdamW + cosine schedule. Defaults are the tokenizer row of the paper's Table 6."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-6
    weight_decay: float = 0.001
    warmup_steps: int = 5000
    total_steps: int | None = None  # None: the trainer's max_steps / estimated stepping batches
    min_lr_ratio: float = 0.0  # final lr as a fraction of the peak
    extra_lr: dict[str, float] = field(default_factory=dict)  # parameter-name prefix -> its own peak lr


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class StageModule(pl.LightningModule):
    """Base LightningModule of a stage. Subclasses build their models in ``__init__`` (or
    ``configure_model``), implement the steps and ``export``, and list frozen sub-modules in
    ``frozen_prefixes``."""

    export_name = "stage"

    def __init__(self, optimizer: OptimizerConfig | None = None, init_from: str | None = None,
                 export_dir: str | None = None):
        super().__init__()
        self.optimizer_config = optimizer or OptimizerConfig()
        self.init_from = init_from
        self.export_dir = export_dir

    # ---- frozen parts ------------------------------------------------------------------------
    def frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of frozen sub-modules: never optimised, never checkpointed."""
        return ()

    def _is_frozen(self, name: str) -> bool:
        return any(name.startswith(p) for p in self.frozen_prefixes())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict", {})
        for name in [n for n in state if self._is_frozen(n)]:
            del state[name]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Frozen weights come from init_from / their own files, not from the checkpoint.
        state = checkpoint.get("state_dict")
        if state is not None:
            for name, value in self.state_dict().items():
                if self._is_frozen(name) and name not in state:
                    state[name] = value

    # ---- init_from ---------------------------------------------------------------------------
    def load_init_from(self, directory: str) -> None:
        """Load a previous stage's export; subclasses say what it must contain."""
        raise TypeError(f"{type(self).__name__} does not take init_from")

    def setup(self, stage: str) -> None:
        # Any trainer function: fit starts a new run from it; predict/validate/test use it as the weights.
        if self.init_from and self.trainer is not None and self.trainer.ckpt_path is None:
            rank_zero_info(f"{type(self).__name__}: initialising from {self.init_from}")
            self.load_init_from(self.init_from)

    # ---- optimisation ------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict]:
        """AdamW groups: no weight decay on biases, norms and embeddings; ``extra_lr`` prefixes get
        their own peak learning rate."""
        cfg = self.optimizer_config
        groups: dict[tuple[float, float], list] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad or self._is_frozen(name):
                continue
            lr = next((v for p, v in cfg.extra_lr.items() if name.startswith(p)), cfg.lr)
            no_decay = param.ndim < 2 or any(k in name.split(".")[-2:][-1] or k in name for k in NO_DECAY_NAMES)
            groups.setdefault((lr, 0.0 if no_decay else cfg.weight_decay), []).append(param)
        return [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()]

    def _total_steps(self) -> int:
        if self.optimizer_config.total_steps:
            return self.optimizer_config.total_steps
        if self.trainer is not None and self.trainer.max_steps and self.trainer.max_steps > 0:
            return self.trainer.max_steps
        return int(self.trainer.estimated_stepping_batches)

    def configure_optimizers(self):
        cfg = self.optimizer_config
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
        total = self._total_steps()
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cosine_with_warmup(step, cfg.warmup_steps, total, cfg.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ---- export ------------------------------------------------------------------------------
    def export(self, directory: str | Path) -> None:
        raise TypeError(f"{type(self).__name__} has nothing to export")

    def on_fit_end(self) -> None:
        if self.export_dir:
            self._export_rank_zero(self.export_dir)

    @rank_zero_only
    def _export_rank_zero(self, directory: str) -> None:
        self.export(directory)
        rank_zero_info(f"{type(self).__name__}: exported to {directory}")
