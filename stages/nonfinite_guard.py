"""Skipping optimizer steps whose loss or gradients are not finite, and refusing non-finite weights.

One NaN in a batch makes the loss and every gradient NaN; an unguarded AdamW step then writes NaN into every
weight and its moments, and an EMA codebook that updated during the forward pass keeps the NaN statistics.
``NonFiniteStepGuard`` is what ``stages.base.StageModule`` runs around each optimizer step: a bad step is
skipped whole (gradients dropped, buffers restored, the same decision on every rank), and too many bad steps in
a row stop training with ``NonFiniteTrainingError``, because then the data or the recipe is broken. How each
part is done is in ``NonFiniteStepGuard``'s docstring.

Under fp16 mixed precision a finite loss with inf gradients is the gradient scaler's own overflow, which it
skips and recovers from by itself; such steps are neither counted nor touched here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


class NonFiniteTrainingError(RuntimeError):
    """Training stopped: too many optimizer steps in a row had a non-finite loss or gradient."""


class NonFiniteExportError(RuntimeError):
    """An export was refused because some of its weights are NaN or infinite."""


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (an FSDP2 ``DTensor``'s local shard; any other tensor itself)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def nonfinite_names(tensors: Iterable[tuple[str, torch.Tensor]], cast_to: torch.dtype | None = None) -> list[str]:
    """Names of the floating tensors holding a NaN or an infinity (after a cast to ``cast_to``, when given:
    a float16 export overflows where float32 weights do not). One host sync for all of them."""
    names, flags = [], []
    for name, tensor in tensors:
        tensor = local_tensor(tensor.detach())
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        if cast_to is not None and cast_to.is_floating_point:
            tensor = tensor.to(cast_to)
        names.append(name)
        flags.append(torch.isfinite(tensor).all().to(device="cpu", non_blocking=True))
    if not flags:
        return []
    finite = torch.stack(flags).tolist()
    return [name for name, ok in zip(names, finite) if not ok]


def gradients_are_finite(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """A 0-dim bool tensor: every gradient this optimizer would apply is finite (no host sync)."""
    grads = [local_tensor(p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return torch.tensor(True)
    # max |g| is NaN if any entry is NaN and inf if any is inf; unlike a 2-norm it cannot overflow.
    largest = torch.nn.utils.get_total_norm(grads, norm_type=float("inf"), error_if_nonfinite=False)
    return torch.isfinite(largest)


class NonFiniteStepGuard:
    """State of the non-finite step check of one training module (why: the module docstring).

    * before the (first micro-batch's) forward it copies the module's buffers, because EMA codebooks, their
      counters and batch-norm statistics change during the forward pass, before any loss exists;
    * it ANDs the finiteness of every loss that is back-propagated into this step;
    * before clipping and the step it checks the gradients (their max-abs, which is NaN or inf exactly when one
      entry is), and every rank takes the same decision: the flag is reduced over the process group, because
      FSDP2 ranks hold different gradient shards and only one of them may see the NaN;
    * a bad step is skipped by dropping every gradient (``zero_grad(set_to_none=True)``: AdamW leaves a
      parameter without gradient alone, moments and weight decay included) and restoring the buffers. It still
      counts as a step for the trainer, like a mixed-precision overflow step;
    * ``max_in_a_row`` bad steps in a row raise ``NonFiniteTrainingError``: the data or the recipe is broken, and
      training on would only spend compute.

    ``any_rank`` turns this rank's "the step is bad" into "some rank's step is bad" (identity on one process).
    """

    def __init__(self, max_in_a_row: int):
        if int(max_in_a_row) < 1:
            raise ValueError(f"max_nonfinite_steps must be at least 1, got {max_in_a_row}")
        self.max_in_a_row = int(max_in_a_row)
        self.skipped = 0  # bad steps skipped in this run (checkpointed)
        self.in_a_row = 0
        self._buffers: dict[str, torch.Tensor] | None = None
        self._loss_finite: torch.Tensor | None = None

    # ---- around the forward / backward ----------------------------------------------------------
    def snapshot_buffers(self, module: nn.Module, skip: Callable[[str], bool]) -> None:
        """Copy the buffers that a forward pass may change (once per optimizer step, accumulation included)."""
        if self._buffers is None:
            self._buffers = {name: buf.detach().clone() for name, buf in module.named_buffers()
                             if not skip(name)}

    def record_loss(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    # ---- before the optimizer step --------------------------------------------------------------
    def check_step(self, module: nn.Module, optimizer: torch.optim.Optimizer,
                   any_rank: Callable[[bool], bool], scaler_in_use: bool = False) -> bool:
        """Decide (the same on every rank) whether this step is bad; if so drop its gradients and restore the
        buffers. Returns True when the step was skipped; raises ``NonFiniteTrainingError`` at the limit."""
        ok = self._loss_finite is None or bool(self._loss_finite)
        if ok and not scaler_in_use:
            ok = bool(gradients_are_finite(optimizer))
        bad = any_rank(not ok)
        buffers, self._buffers, self._loss_finite = self._buffers, None, None
        if not bad:
            self.in_a_row = 0
            return False
        optimizer.zero_grad(set_to_none=True)
        if buffers:
            current = dict(module.named_buffers())
            with torch.no_grad():
                for name, saved in buffers.items():
                    current[name].copy_(saved)
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteTrainingError(
                f"{self.in_a_row} optimizer steps in a row had a non-finite loss or gradient (limit "
                f"max_nonfinite_steps={self.max_in_a_row}; {self.skipped} skipped in this run): the data holds "
                "NaN/inf values or the recipe diverges (learning rate, precision). Training stopped; no export "
                "was written.")
        return True

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.in_a_row = int(state.get("in_a_row", 0))
