"""Ways for a test ``fit`` to die as an unlucky one does: SIGKILL at a chosen step, or in the middle of writing a
checkpoint (half the bytes on disk, as a kill during Lightning's write leaves them). Used from configs as
``tests.fault_injection.<Name>`` (the subprocess needs the repository on ``PYTHONPATH``)."""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO


class KillAtStep(Callback):
    """SIGKILL this process when the batch after optimizer step ``step`` starts (its checkpoints, if any, are
    written by then: checkpoint callbacks run at the end of the previous batch)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class StopAtStep(Callback):
    """Stops ``fit`` (every rank, after that step's checkpoints) at optimizer step ``step`` while its
    ``max_steps`` and so its schedule stay those of the whole run: a job whose time slot ended."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class RecordStart(Callback):
    """Appends the global step each ``fit`` starts training at to ``path`` (one line per run)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        with open(self.path, "a") as f:
            f.write(f"{trainer.global_step}\n")


class KillWhileSavingLast(TorchCheckpointIO):
    """Writes checkpoints as usual, except that the ``nth`` write of a ``last*.ckpt`` in this process stops
    half-way: half its bytes reach the file, then the process is SIGKILLed."""

    def __init__(self, nth: int = 1):
        super().__init__()
        self.nth, self.seen = nth, 0

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if Path(path).name.startswith("last"):
            self.seen += 1
            if self.seen == self.nth:
                buffer = io.BytesIO()
                torch.save(checkpoint, buffer)
                data = buffer.getvalue()
                with open(path, "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                    os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
        super().save_checkpoint(checkpoint, path, storage_options)


class PoisonBatches(Callback):
    """Puts a NaN into the ``key`` tensor of the batches of optimizer steps ``steps`` (on ``rank`` only, when
    given): bad data reaching a stage, whatever the loader lets through."""

    def __init__(self, steps: list[int], key: str = "motion", rank: int | None = None):
        self.steps, self.key, self.rank = set(steps), key, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps and self.rank in (None, trainer.global_rank):
            batch[self.key].view(-1)[0] = float("nan")


class PoisonGradient(Callback):
    """After the backward pass of optimizer step ``step``, on ``rank`` only, sets the first entry of this rank's
    part of the first gradient to NaN (under FSDP2 the other ranks' shards stay finite)."""

    def __init__(self, step: int, rank: int = 0):
        self.step, self.rank = step, rank

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step != self.step or trainer.global_rank != self.rank:
            return
        grad = next(p.grad for p in pl_module.parameters() if p.grad is not None)
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        local.view(-1)[0] = float("nan")
