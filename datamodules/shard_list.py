"""Resolving shard specs to URL lists, and splitting them across ranks and workers."""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Sequence

import braceexpand

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "gcs://")


class ShardSpecError(ValueError):
    """A shard spec resolves to nothing, or to local files that do not exist."""


def _expand_one(spec: str) -> list[str]:
    if spec.startswith(REMOTE_PREFIXES):
        return list(braceexpand.braceexpand(spec))
    path = Path(spec)
    if path.is_dir():
        manifest = path / "manifest.json"
        if manifest.is_file():
            names = json.loads(manifest.read_text())["shards"]
            return [str(path / name) for name in names]
        tars = sorted(str(p) for p in path.glob("*.tar"))
        if not tars:
            raise ShardSpecError(f"{path} has neither a manifest.json nor .tar shards")
        return tars
    if path.name == "manifest.json" and path.is_file():
        return _expand_one(str(path.parent))
    urls = []
    for expanded in braceexpand.braceexpand(spec):
        matches = sorted(glob.glob(expanded)) if any(c in expanded for c in "*?[") else [expanded]
        urls.extend(matches)
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise ShardSpecError(f"shard(s) not found: {missing[:3]}{' …' if len(missing) > 3 else ''} (from {spec!r})")
    return urls


def resolve_shards(spec: str | Sequence[str]) -> list[str]:
    """Shard URLs from a prepared directory (its manifest), a manifest, brace/glob patterns, remote
    URLs (``pipe:…``, ``s3://…``) or a list of any of these. Errors name what is missing."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls = [url for s in specs for url in _expand_one(str(s))]
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
