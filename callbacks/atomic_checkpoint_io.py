"""Checkpoint writes that leave nothing behind in ``$TMPDIR`` and get normal file permissions.

Lightning's ``TorchCheckpointIO`` writes a local checkpoint through an fsspec transaction, whose
temporary file is ``tempfile.mkstemp()`` in ``$TMPDIR``: a run killed mid-write leaves a checkpoint-sized
file there, and where ``$TMPDIR`` is another filesystem the final move is a copy, not an atomic rename.
Here the checkpoint is written to a hidden file next to its destination and renamed into place
(``videolavit.atomic_files``), removed when the write fails. Remote paths (``s3://`` ...) keep Lightning's
own writer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from videolavit.atomic_files import atomic_file


def is_local_path(path: str | os.PathLike) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes go through a hidden sibling file and an atomic rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None or not is_local_path(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        local = Path(str(path).removeprefix("file://"))
        get_filesystem(str(local)).makedirs(str(local.parent), exist_ok=True)
        with atomic_file(local) as tmp:
            torch.save(checkpoint, tmp)
