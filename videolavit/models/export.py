"""Sub-model exports: one safetensors file of weights plus a small JSON config per sub-model.

Exports are how stages hand weights to each other and to inference without Lightning: the JSON
names the model class and its constructor config, the safetensors file holds tensors only, so
loading never unpickles arbitrary objects. An export directory may come from anyone, so the class
the JSON names is looked up in :data:`EXPORTABLE` (the project's own exportable models and their config
dataclasses), never imported by name: a JSON naming anything else is an :class:`UnregisteredClassError`,
and the config is plain JSON data given to the registered config dataclass. Nothing non-finite is ever
written (a NaN model must not replace a good export), and files are written atomically
(``videolavit.atomic_files``) with normal permissions.

The detokenizers export as diffusers-style directories: their U-Net in a ``unet/`` subfolder written by
the U-Net's own ``save_pretrained`` (:func:`save_diffusers_subfolder`, read back with
:func:`read_diffusers_weights`), everything else in the registry-checked ``{name}.safetensors`` + ``.json``
(``save_export(..., exclude=("unet.",))``).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from videolavit.atomic_files import atomic_file, write_text_atomic

FORMAT_VERSION = 1

# class_path -> config_class of every model an export may hold. Listed by name (not imported here) because
# the model modules import this one; only these modules are ever imported by the loader.
EXPORTABLE: dict[str, str] = {
    "videolavit.models.eva_vit.EvaViT": "videolavit.models.eva_vit.EvaViTConfig",
    "videolavit.models.keyframe_detokenizer.KeyframeDetokenizer":
        "videolavit.models.keyframe_detokenizer.KeyframeDetokenizerConfig",
    "videolavit.models.keyframe_feature_decoder.KeyframeFeatureDecoder":
        "videolavit.models.keyframe_feature_decoder.KeyframeFeatureDecoderConfig",
    "videolavit.models.keyframe_tokenizer.KeyframeTokenizer":
        "videolavit.models.keyframe_tokenizer.KeyframeTokenizerConfig",
    "videolavit.models.motion_condition_encoder.MotionConditionEncoder":
        "videolavit.models.motion_condition_encoder.MotionConditionEncoderConfig",
    "videolavit.models.motion_tokenizer.MotionTokenizer": "videolavit.models.motion_tokenizer.MotionTokenizerConfig",
    "videolavit.models.video_detokenizer.VideoDetokenizer": "videolavit.models.video_detokenizer.VideoDetokenizerConfig",
}


class ExportError(RuntimeError):
    """An export directory is missing, incomplete, or does not match the model it is loaded into."""


class UnregisteredClassError(ExportError):
    """An export names a model or config class that is not one of the project's exportable classes."""


class NonFiniteExportError(ExportError):
    """A model with NaN/Inf tensors was about to be exported (nothing was written)."""


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _registered(path: str) -> type:
    """The class ``path`` names; only called with names from :data:`EXPORTABLE`."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def exportable_classes(model_path: Any, config_path: Any, source: str) -> tuple[type, type]:
    """``(model class, config dataclass)`` for the names an export records, or :class:`UnregisteredClassError`."""
    allowed = ", ".join(sorted(EXPORTABLE))
    if not isinstance(model_path, str) or model_path not in EXPORTABLE:
        raise UnregisteredClassError(f"{source} names class_path {model_path!r}, which is not an exportable "
                                     f"videolavit model; allowed: {allowed}")
    expected_config = EXPORTABLE[model_path]
    if config_path is not None and config_path != expected_config:
        raise UnregisteredClassError(f"{source} names config_class {config_path!r} for {model_path}; the only "
                                     f"config class it takes is {expected_config}")
    return _registered(model_path), _registered(expected_config)


def check_export_class(meta: dict, expected: type, source: str) -> None:
    """Raise unless ``meta`` names a registered class that is ``expected`` (or a subclass), with its own config."""
    cls, _ = exportable_classes(meta.get("class_path"), meta.get("config_class"), source)
    if not issubclass(cls, expected):
        raise ExportError(f"{source} holds a {cls.__name__}, not a {expected.__name__}")


def _config_to_dict(config: Any) -> dict:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, dict):
        return dict(config)
    raise TypeError(f"export config must be a dataclass or dict, got {type(config).__name__}")


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in ``state`` holding a NaN or an infinity."""
    return sorted(k for k, v in state.items()
                  if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all()))


def write_export(directory: str | Path, name: str, state: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``state`` as ``{name}.safetensors`` and ``meta`` as ``{name}.json`` in ``directory``, each atomically.

    Refuses (:class:`NonFiniteExportError`, nothing written or replaced) when a tensor is not finite.
    Returns the weights path.
    """
    directory = Path(directory)
    bad = non_finite_tensors(state)
    if bad:
        raise NonFiniteExportError(
            f"refusing to export '{name}' to {directory}: {len(bad)} tensor(s) hold NaN or Inf ({', '.join(bad[:8])}"
            f"{', ...' if len(bad) > 8 else ''}); the previous export, if any, is left as it was")
    text = json.dumps(meta, indent=2, sort_keys=True)  # before writing anything: a record that is not JSON fails here
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{name}.safetensors"
    with atomic_file(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": "videolavit", "name": name})
    write_text_atomic(directory / f"{name}.json", text)
    return weights


def save_export(module: torch.nn.Module, directory: str | Path, name: str, config: Any,
                extra: dict | None = None, exclude: tuple[str, ...] = ()) -> Path:
    """Write ``{directory}/{name}.safetensors`` and ``{directory}/{name}.json``; returns the weights path.

    ``module`` must be one of :data:`EXPORTABLE`, constructible as ``type(module)(config_class(**config))``;
    its class path is recorded so ``load_export`` can rebuild it. Tensors whose names start with one of
    ``exclude`` are left out (written elsewhere, e.g. a U-Net's ``save_pretrained`` subfolder).
    """
    cls = type(module)
    model_path = class_path(cls)
    _, config_cls = exportable_classes(model_path, None, f"save_export('{name}')")
    if dataclasses.is_dataclass(config) and not isinstance(config, config_cls):
        raise UnregisteredClassError(f"save_export('{name}'): {model_path} takes a {class_path(config_cls)}, "
                                     f"got a {class_path(type(config))}")
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()
             if not (exclude and k.startswith(exclude))}
    meta = {
        "format_version": FORMAT_VERSION,
        "class_path": model_path,
        "config": _config_to_dict(config),
        "config_class": class_path(config_cls),
    }
    if extra:
        meta["extra"] = extra
    return write_export(directory, name, state, meta)


def read_export(directory: str | Path, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Return ``(state_dict, meta)`` of an export without building the model.

    Missing, unreadable or truncated files are :class:`ExportError` naming the file; ``meta`` is a JSON
    object whose ``config`` (if any) is a JSON object.
    """
    directory = Path(directory)
    weights, meta_path = directory / f"{name}.safetensors", directory / f"{name}.json"
    for path in (weights, meta_path):
        if not path.is_file():
            raise ExportError(f"export '{name}' is incomplete: {path} does not exist")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or not UTF-8
        raise ExportError(f"export '{name}': cannot read {meta_path} as JSON ({exc}); re-export it") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config", {}), dict):
        raise ExportError(f"export '{name}': {meta_path} is not an export record (a JSON object with a 'config' "
                          "object); re-export it")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ExportError(f"export '{name}': {weights} is truncated or not a safetensors file ({exc}); "
                          "re-export it") from None
    return state, meta


def load_export(directory: str | Path, name: str, map_location: str | torch.device = "cpu",
                expected: type | None = None) -> torch.nn.Module:
    """Rebuild the exported module from its JSON config and load its weights strictly.

    Only classes of :data:`EXPORTABLE` are built; ``expected`` additionally requires that class (or a subclass).
    """
    state, meta = read_export(directory, name)
    source = f"export '{name}' in {directory}"
    cls, config_cls = exportable_classes(meta.get("class_path"), meta.get("config_class"), source)
    if expected is not None:
        check_export_class(meta, expected, source)
    try:
        model = cls(config_cls(**meta.get("config", {})))
    except (TypeError, ValueError, KeyError) as exc:
        raise ExportError(f"{source}: its config does not build a {cls.__name__} ({exc}); re-export it") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise ExportError(f"{source} does not match {meta['class_path']}: {exc}") from None
    if missing or unexpected:
        raise ExportError(
            f"{source} does not match {meta['class_path']}: "
            f"missing={sorted(missing)[:8]} unexpected={sorted(unexpected)[:8]}"
        )
    return model.to(map_location)


# ---- diffusers subfolders ------------------------------------------------------------------------------

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def drop_source_path(folder: str | Path) -> None:
    """Remove ``_name_or_path`` (where the model was once loaded from: an absolute path) from the
    ``config.json`` a diffusers ``save_pretrained`` wrote: exports name no path outside themselves."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if "_name_or_path" in config:
        config.pop("_name_or_path")
        write_text_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_diffusers_subfolder(model: torch.nn.Module, directory: str | Path, subfolder: str) -> Path:
    """``model.save_pretrained`` (a diffusers ``ModelMixin``) into ``directory/subfolder``, replacing it whole.

    Refuses a model with NaN/Inf tensors (:class:`NonFiniteExportError`, nothing written). The new folder is
    written next to the old one and swapped in, so a failed write leaves the previous one as it was.
    """
    directory = Path(directory)
    bad = non_finite_tensors(dict(model.state_dict()))
    if bad:
        raise NonFiniteExportError(f"refusing to export '{subfolder}' to {directory}: {len(bad)} tensor(s) hold NaN "
                                   f"or Inf ({', '.join(bad[:8])}); the previous export, if any, is left as it was")
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / subfolder
    tmp = directory / f".{subfolder}.{secrets.token_hex(6)}.partial"
    old = directory / f".{subfolder}.{secrets.token_hex(6)}.old"
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        drop_source_path(tmp)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return final


DIFFUSERS_SCHEDULERS = ("DDIMScheduler", "EulerAncestralDiscreteScheduler", "EulerDiscreteScheduler", "EDMEulerScheduler")


def save_diffusers_scheduler(config: dict, directory: str | Path, subfolder: str = "scheduler") -> Path:
    """``directory/subfolder/scheduler_config.json`` through the diffusers scheduler's own ``save_pretrained``
    (``config["_class_name"]`` one of :data:`DIFFUSERS_SCHEDULERS`)."""
    import diffusers

    name = config.get("_class_name")
    if name not in DIFFUSERS_SCHEDULERS:
        raise ExportError(f"scheduler {name!r} is not one of {DIFFUSERS_SCHEDULERS}")
    scheduler = getattr(diffusers, name).from_config({k: v for k, v in config.items() if k != "_class_name"})
    target = Path(directory) / subfolder
    scheduler.save_pretrained(str(target))
    return target


def read_diffusers_config(directory: str | Path) -> dict:
    """``config.json`` of a diffusers ``save_pretrained`` folder, or :class:`ExportError`."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ExportError(f"{directory} is not a diffusers model folder: {path} does not exist; re-export it")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {path} as JSON ({exc}); re-export it") from None
    if not isinstance(config, dict):
        raise ExportError(f"{path} is not a JSON object; re-export it")
    return config


def read_diffusers_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a diffusers ``save_pretrained`` folder (one safetensors file or a sharded index).

    Only safetensors are read (nothing is unpickled); missing or broken files are :class:`ExportError`.
    """
    directory = Path(directory)
    if (directory / DIFFUSERS_WEIGHTS).is_file():
        files = [directory / DIFFUSERS_WEIGHTS]
    elif (directory / DIFFUSERS_INDEX).is_file():
        try:
            weight_map = json.loads((directory / DIFFUSERS_INDEX).read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ExportError(f"{directory / DIFFUSERS_INDEX} is not a weight index ({exc}); re-export it") from None
        if any(not isinstance(n, str) or Path(n).name != n for n in names):
            raise ExportError(f"{directory / DIFFUSERS_INDEX} names shards outside {directory}; re-export it")
        files = [directory / n for n in names]
    else:
        raise ExportError(f"no weights in {directory}: expected {DIFFUSERS_WEIGHTS} or {DIFFUSERS_INDEX} "
                          "(a diffusers save_pretrained folder); re-export it")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            state.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ExportError(f"{path} is missing, truncated or not a safetensors file ({exc}); re-export it") from None
    return state
