"""Stage configs written as a delta of shared base files: a top-level ``base:`` names them.

The trainer, logger and checkpoint settings are the same for most stages; written once in
``experiments/base/`` (``experiments/tiny/base/`` for the CPU runs), each stage YAML keeps only what is its
own, and users still run one file (``fit --config experiments/<stage>.yaml``). ``base`` is a path or a list
of paths relative to the YAML that names them; bases are read first (in order, each with its own bases),
then the file itself, and the merge follows what jsonargparse does with several ``--config`` files, plus one
rule for callback lists:

* mappings merge key by key; a mapping whose ``class_path`` differs from the base's replaces it whole;
* a non-empty list of ``class_path`` mappings (``trainer.callbacks``) updates the base entry with the same
  ``class_path`` and appends the others, in order; every other value (an empty list too) replaces the base's.

A missing, unreadable or cyclic base is a ``ConfigBaseError`` naming the file and the ``base`` entry.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

BASE_KEY = "base"


class ConfigBaseError(ValueError):
    """A config's ``base:`` entry names a missing or unreadable file, or leads back to the config itself."""


def _is_class_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and "class_path" in v for v in value)


def merge_config(base: Any, delta: Any) -> Any:
    """``delta`` applied over ``base`` (neither is modified), by the rules of this module's docstring."""
    if isinstance(base, dict) and isinstance(delta, dict):
        if "class_path" in base and "class_path" in delta and base["class_path"] != delta["class_path"]:
            return copy.deepcopy(delta)
        merged = copy.deepcopy(base)
        for key, value in delta.items():
            merged[key] = merge_config(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    if _is_class_list(base) and _is_class_list(delta):
        merged = copy.deepcopy(base)
        updated: set[int] = set()
        for entry in delta:
            match = next((i for i, old in enumerate(merged)
                          if i not in updated and old["class_path"] == entry["class_path"]), None)
            if match is None:
                merged.append(copy.deepcopy(entry))
                updated.add(len(merged) - 1)
            else:
                merged[match] = merge_config(merged[match], entry)
                updated.add(match)
        return merged
    return copy.deepcopy(delta)


def _load_mapping(path: Path, named_by: str) -> dict:
    """The YAML mapping in ``path``; ``named_by`` (empty for the config itself) says which ``base:`` named it."""
    prefix = f"{named_by}: " if named_by else ""
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigBaseError(f"{prefix}cannot read {path} ({error.strerror or error})") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigBaseError(f"{prefix}{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ConfigBaseError(f"{prefix}{path} holds a {type(config).__name__}, not a mapping of settings")
    return config


def _base_entries(config: dict, path: Path) -> list[str]:
    entries = config.get(BASE_KEY)
    entries = [entries] if isinstance(entries, str) else entries
    if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
        raise ConfigBaseError(f"{path}: `{BASE_KEY}:` must be a file path or a list of file paths (relative to "
                              f"{path.parent}), got {config.get(BASE_KEY)!r}")
    return entries


def _resolve(path: Path, chain: tuple[Path, ...], named_by: str) -> dict:
    config = _load_mapping(path, named_by)
    if BASE_KEY not in config:
        return config
    merged: dict = {}
    for entry in _base_entries(config, path):
        base = (path.parent / entry).resolve()
        if base in chain or base == path:
            cycle = " -> ".join(str(p) for p in (*chain, path, base))
            raise ConfigBaseError(f"{path}: `{BASE_KEY}: {entry}` leads back to a config already being read ({cycle})")
        if not base.is_file():
            raise ConfigBaseError(f"{path}: `{BASE_KEY}: {entry}` names no file ({base} does not exist)")
        merged = merge_config(merged, _resolve(base, (*chain, path), f"{path}: `{BASE_KEY}: {entry}`"))
    return merge_config(merged, {k: v for k, v in config.items() if k != BASE_KEY})


def read_config(path: str | Path) -> dict:
    """The settings of the YAML file ``path`` with its bases applied (a file without ``base:`` as it is)."""
    return _resolve(Path(path).resolve(), (), "")


def has_bases(path: str | Path) -> bool:
    """Whether ``path`` is a readable YAML mapping with a top-level ``base:`` (False for anything else)."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(config, dict) and BASE_KEY in config
