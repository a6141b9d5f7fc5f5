"""Resolving shard specs to URL lists, and splitting them across ranks and workers.

A local directory (or its ``manifest.json``) is a ``prepare`` output: only the shards its manifest lists
are read, and only when the manifest says the preparation is complete; a missing or incomplete manifest
is a ``ManifestError`` unless ``allow_incomplete`` is set (then a warning, and the listed shards, or the
directory's ``.tar`` files when there is no manifest). Explicit shard files, glob and brace patterns and
remote URLs (``pipe:``, ``s3://``, ...) are taken as given: whoever names shards one by one has chosen them.
"""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path
from typing import Sequence

import braceexpand

log = logging.getLogger(__name__)

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "gcs://")
MANIFEST = "manifest.json"
ALLOW_HINT = "set allow_incomplete: true in the DataModule config (--data.init_args.allow_incomplete true)"


class ShardSpecError(ValueError):
    """A shard spec resolves to nothing, or to local files that do not exist."""


class ManifestError(ShardSpecError):
    """A prepared directory whose manifest is missing, unreadable, or says the preparation is incomplete."""


def _prepared_directory(path: Path, allow_incomplete: bool) -> list[str]:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        tars = sorted(str(p) for p in path.glob("*.tar"))
        if not allow_incomplete:
            raise ManifestError(f"{path} has no {MANIFEST} ({len(tars)} .tar files): it is not a finished `prepare` "
                                f"output; run prepare on it to completion, name its shards explicitly, or {ALLOW_HINT} "
                                "to read its .tar files as they are")
        if not tars:
            raise ShardSpecError(f"{path} has neither a {MANIFEST} nor .tar shards")
        log.warning("%s has no %s; reading its %d .tar files as they are (allow_incomplete)", path, MANIFEST,
                    len(tars))
        return tars
    try:
        manifest = json.loads(manifest_path.read_text())
        names = manifest["shards"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise TypeError("shards is not a list of names")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"{manifest_path} is not a readable prepare manifest ({exc}); rerun prepare on "
                            f"{path}") from None
    if manifest.get("complete") is not True:
        done = f"{manifest.get('units_done', '?')}/{manifest.get('units_total', '?')} units done"
        if not allow_incomplete:
            raise ManifestError(f"{manifest_path} says the preparation is incomplete ({done}); run every --part of "
                                f"prepare to the end, or {ALLOW_HINT} to read the finished units' shards")
        log.warning("%s is incomplete (%s); reading the %d shards of its finished units (allow_incomplete)",
                    manifest_path, done, len(names))
    urls = [str(path / name) for name in names]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise ManifestError(f"{len(missing)} shard(s) listed in {manifest_path} are missing (e.g. {missing[0]}); "
                            f"rerun prepare on {path} to restore them")
    return urls


def _expand_one(spec: str, allow_incomplete: bool = False) -> list[str]:
    if spec.startswith(REMOTE_PREFIXES):
        return list(braceexpand.braceexpand(spec))
    path = Path(spec)
    if path.is_dir():
        return _prepared_directory(path, allow_incomplete)
    if path.name == MANIFEST and path.is_file():
        return _prepared_directory(path.parent, allow_incomplete)
    urls = []
    for expanded in braceexpand.braceexpand(spec):
        matches = sorted(glob.glob(expanded)) if any(c in expanded for c in "*?[") else [expanded]
        urls.extend(matches)
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise ShardSpecError(f"shard(s) not found: {missing[:3]}{' …' if len(missing) > 3 else ''} (from {spec!r})")
    return urls


def resolve_shards(spec: str | Sequence[str], allow_incomplete: bool = False) -> list[str]:
    """Shard URLs from a prepared directory (its complete manifest), a manifest, brace/glob patterns, remote
    URLs (``pipe:…``, ``s3://…``) or a list of any of these. Errors name what is missing; ``allow_incomplete``
    accepts a prepared directory whose manifest is missing or incomplete (with a warning)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls = [url for s in specs for url in _expand_one(str(s), allow_incomplete)]
    if not urls:
        raise ShardSpecError(f"no shards in {spec!r}")
    return urls


def split_by_rank(urls: list[str], rank: int, world_size: int) -> tuple[list[str], bool]:
    """This rank's shards. With fewer shards than ranks every rank keeps all shards and the caller
    must split by sample instead (second value True), so no rank is left without data."""
    if world_size <= 1:
        return list(urls), False
    if len(urls) >= world_size:
        return urls[rank::world_size], False
    return list(urls), True
