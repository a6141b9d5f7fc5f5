"""What every training stage shares: AdamW with linear warm-up + cosine decay, ``init_from``, frozen
sub-modules kept out of checkpoints, a guard that skips optimizer steps with a non-finite loss or gradient
(``stages.nonfinite_guard``; ``train/nonfinite_skipped`` counts them, ``max_nonfinite_steps`` in a row stop the
run), and an export written at the end of ``fit`` only from finite weights, staged so that a failure leaves
the previous export untouched (``stages.staged_export``).

``init_from`` (weights only, from a previous stage's export) is applied once, at the start of a new
run; resuming the same stage is Lightning's ``--ckpt_path`` and the CLI refuses both together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from stages.nonfinite_guard import NonFiniteExportError, NonFiniteStepGuard, nonfinite_names
from stages.staged_export import write_staged

NONFINITE_STATE_KEY = "nonfinite_steps"  # checkpoint entry: the guard's counters
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
    ``frozen_prefixes``.

    ``max_nonfinite_steps``: optimizer steps in a row with a non-finite loss or gradient after which ``fit``
    stops with ``NonFiniteTrainingError`` (each one is skipped: no weight, moment or buffer changes)."""

    export_name = "stage"

    def __init__(self, optimizer: OptimizerConfig | None = None, init_from: str | None = None,
                 export_dir: str | None = None, max_nonfinite_steps: int = 20):
        super().__init__()
        self.optimizer_config = optimizer or OptimizerConfig()
        self.init_from = init_from
        self.export_dir = export_dir
        self.nonfinite_guard = NonFiniteStepGuard(max_nonfinite_steps)

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
        checkpoint[NONFINITE_STATE_KEY] = self.nonfinite_guard.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite_guard.load_state_dict(checkpoint.get(NONFINITE_STATE_KEY, {}))
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

    # ---- non-finite steps ----------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.nonfinite_guard.snapshot_buffers(self, self._is_frozen)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self.nonfinite_guard.record_loss(loss)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this after backward (and after unscaling under fp16 AMP), before clipping and the
        # step, in automatic and manual optimisation alike.
        guard = self.nonfinite_guard
        precision = self.trainer.precision_plugin if self._trainer is not None else None
        skipped = guard.check_step(self, optimizer, any_rank=self._any_rank,
                                   scaler_in_use=getattr(precision, "scaler", None) is not None)
        if skipped and guard.in_a_row == 1:
            rank_zero_warn(f"{type(self).__name__}: step {self.global_step} had a non-finite loss or gradient; "
                           f"optimizer step skipped ({guard.skipped} so far; the run stops after "
                           f"{guard.max_in_a_row} in a row)")
        if self._trainer is not None:
            self.log("train/nonfinite_skipped", float(guard.skipped), on_step=True, on_epoch=False, batch_size=1)

    def _any_rank(self, flag: bool) -> bool:
        if self._trainer is None:
            return flag
        return self.trainer.strategy.reduce_boolean_decision(flag, all=False)

    # ---- export ------------------------------------------------------------------------------
    def export(self, directory: str | Path) -> None:
        raise TypeError(f"{type(self).__name__} has nothing to export")

    def check_exportable(self, cast_to: torch.dtype | None = None) -> None:
        """Raise ``NonFiniteExportError`` on every rank if any trained weight or buffer (this rank's shard) is
        NaN/inf, after a cast to ``cast_to`` if given. A collective under a multi-process strategy."""
        tensors = [(n, t) for n, t in [*self.named_parameters(), *self.named_buffers()] if not self._is_frozen(n)]
        bad = nonfinite_names(tensors, cast_to=cast_to)
        if self._any_rank(bool(bad)):
            where = f": {bad[:8]}{' ...' if len(bad) > 8 else ''}" if bad else " (on another rank)"
            raise NonFiniteExportError(
                f"{type(self).__name__}: refusing to export non-finite weights{where}; "
                f"{self.export_dir or 'the export directory'} was left as it was")

    def on_fit_end(self) -> None:
        if self.export_dir:
            self.check_exportable()
            self._export_rank_zero(self.export_dir)

    @rank_zero_only
    def _export_rank_zero(self, directory: str) -> None:
        write_staged(directory, self.export)
        rank_zero_info(f"{type(self).__name__}: exported to {directory}")
