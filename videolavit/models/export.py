"""Sub-model exports: one safetensors file of weights plus a small JSON config per sub-model.

Exports are how stages hand weights to each other and to inference without Lightning: the JSON
names the model class and its constructor config, the safetensors file holds tensors only, so
loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1


class ExportError(RuntimeError):
    """An export directory is missing, incomplete, or does not match the model it is loaded into."""


def _config_to_dict(config: Any) -> dict:
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    if isinstance(config, dict):
        return dict(config)
    raise TypeError(f"export config must be a dataclass or dict, got {type(config).__name__}")


def save_export(module: torch.nn.Module, directory: str | Path, name: str, config: Any,
                extra: dict | None = None) -> Path:
    """Write ``{directory}/{name}.safetensors`` and ``{directory}/{name}.json``; returns the weights path.

    ``module`` must be constructible as ``type(module)(config_class(**config))`` or
    ``type(module)(**config)``; the class path is recorded so ``load_export`` can rebuild it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    weights = directory / f"{name}.safetensors"
    save_file(state, str(weights), metadata={"format": "videolavit", "name": name})
    cls = type(module)
    meta = {
        "format_version": FORMAT_VERSION,
        "class_path": f"{cls.__module__}.{cls.__qualname__}",
        "config": _config_to_dict(config),
    }
    if dataclasses.is_dataclass(config):
        meta["config_class"] = f"{type(config).__module__}.{type(config).__qualname__}"
    if extra:
        meta["extra"] = extra
    (directory / f"{name}.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return weights


def _import(path: str) -> Any:
    module, _, attr = path.rpartition(".")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def read_export(directory: str | Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Return ``(state_dict, meta)`` of an export without building the model."""
    directory = Path(directory)
    weights, meta_path = directory / f"{name}.safetensors", directory / f"{name}.json"
    for path in (weights, meta_path):
        if not path.is_file():
            raise ExportError(f"export '{name}' is incomplete: {path} does not exist")
    meta = json.loads(meta_path.read_text())
    return load_file(str(weights)), meta


def load_export(directory: str | Path, name: str, map_location: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the exported module from its JSON config and load its weights strictly."""
    state, meta = read_export(directory, name)
    cls = _import(meta["class_path"])
    config = meta["config"]
    if "config_class" in meta:
        config_cls = _import(meta["config_class"])
        model = cls(config_cls(**config))
    else:
        model = cls(**config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(
            f"export '{name}' in {directory} does not match {meta['class_path']}: "
            f"missing={sorted(missing)[:8]} unexpected={sorted(unexpected)[:8]}"
        )
    return model.to(map_location)
