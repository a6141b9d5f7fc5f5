"""Local pretrained networks for the evaluation metrics: find them, load them safely, hold them frozen.

Metric networks (I3D, C3D, CLIP, Inception) are never downloaded: the user names a local path, and a
missing or unset path fails at construction time with a message that names the argument to set, so a
misconfigured validation run stops before training rather than hours into it.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn


class MissingWeightsError(FileNotFoundError):
    """A metric network's local weights are unset or absent; the message names the argument to set."""


def require_file(path: str | Path | None, argument: str, what: str) -> Path:
    """Return ``path`` as a Path if it is an existing file, else raise naming ``argument``."""
    if path is None or str(path) == "":
        raise MissingWeightsError(
            f"`{argument}` is not set: the {what} needs a local weight file. Set `{argument}` to its path "
            f"(videolavit never downloads weights)."
        )
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingWeightsError(
            f"{what} weights not found at '{path}' (from `{argument}`). Set `{argument}` to an existing "
            f"local file (videolavit never downloads weights)."
        )
    return path


def require_directory(path: str | Path | None, argument: str, what: str) -> Path:
    """Return ``path`` as a Path if it is an existing directory, else raise naming ``argument``."""
    if path is None or str(path) == "":
        raise MissingWeightsError(
            f"`{argument}` is not set: the {what} needs a local directory (as written by save_pretrained). "
            f"Set `{argument}` to it (videolavit never downloads weights)."
        )
    path = Path(path).expanduser()
    if not path.is_dir():
        raise MissingWeightsError(
            f"{what} directory not found at '{path}' (from `{argument}`). Set `{argument}` to an existing "
            f"local directory written by save_pretrained (videolavit never downloads weights)."
        )
    return path


def is_torchscript_file(path: str | Path) -> bool:
    """TorchScript archives are zip files with a ``code/`` folder; ``torch.save`` archives have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.startswith("code/") for name in archive.namelist())


def is_safetensors_file(path: str | Path) -> bool:
    """A safetensors file starts with a little-endian u64 header length followed by a JSON object."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 0 < header_len < 100_000_000


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or ``torch.save`` file, never unpickling arbitrary objects.

    Unwraps the common containers (``{"state_dict": ...}``, ``{"model": ...}``) and a DataParallel
    ``module.`` prefix so that checkpoints saved by other projects load as plain state dicts.
    """
    path = Path(path)
    if is_safetensors_file(path):
        from safetensors.torch import load_file

        state: Any = load_file(str(path), device="cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(
                f"could not read '{path}' as a state dict (safetensors or torch.save of tensors only): {error}"
            ) from error
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"'{path}' does not hold a flat mapping of names to tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    """A TorchScript detector on the CPU, in eval mode (its own ``forward`` signature is kept)."""
    return torch.jit.load(str(path), map_location="cpu").eval()


def script_argument_names(network: nn.Module) -> set[str]:
    """Names ``forward`` accepts, so detectors with extra switches (e.g. ``return_features``) get them."""
    schema = getattr(getattr(network, "forward", None), "schema", None)
    if schema is None:
        return set()
    return {argument.name for argument in schema.arguments}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


class FrozenNetwork(nn.Module):
    """Holds a metric's pretrained network out of the metric's state dict and training mode.

    The network follows device moves of the metric (``.to(device)``) but ignores dtype casts so it
    always runs in float32, and it is not a registered child, so metric/LightningModule state dicts,
    ``train()`` calls and optimisers never see its weights.
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        network.eval()
        for parameter in network.parameters():
            parameter.requires_grad_(False)
        object.__setattr__(self, "network", network)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - nn.Module signature
        probe = fn(torch.zeros((), dtype=torch.float32))
        self.network.to(device=probe.device)
        return self

    @property
    def device(self) -> torch.device:
        for tensor in list(self.network.parameters()) + list(self.network.buffers()):
            return tensor.device
        return torch.device("cpu")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.network(*args, **kwargs)
