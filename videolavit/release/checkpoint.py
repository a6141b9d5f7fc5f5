"""The release's `.bin` weight files: torch pickles of state dicts, read with ``weights_only=True``.

``weights_only`` makes ``torch.load`` refuse anything but tensors and plain containers, so a hostile or
corrupt file is a named error, never code run on this machine.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch


class ReleaseCheckpointError(ValueError):
    """A release weight file is missing, unreadable, or not a flat state dict of tensors."""


def load_bin_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of a `.bin` file (a state dict, possibly under "state_dict" / "model")."""
    path = Path(path)
    if not path.is_file():
        raise ReleaseCheckpointError(f"release weight file {path} does not exist")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, AttributeError, TypeError) as exc:
        raise ReleaseCheckpointError(f"{path} is not a tensors-only torch file (read with weights_only=True): "
                                     f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict) and len(obj) <= 3:
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise ReleaseCheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ReleaseCheckpointError(f"{path}: entries that are not named tensors: {[str(k) for k in bad[:5]]}")
    return dict(obj)
