"""The token-dump file layout and its reader: what ``callbacks.token_dump.TokenDumpWriter`` writes.

A dump is one JSONL file per rank plus a manifest written last; the reader refuses a dump without its
manifest, or one whose files contradict it, rather than return part of a corpus. It lives in the library so
tools and tests read dumps without importing Lightning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FORMAT = "videolavit-token-dump"
FORMAT_VERSION = 1


def manifest_path(directory: Path, name: str) -> Path:
    return directory / f"{name}_tokens.json"


def rank_file(name: str, rank: int) -> str:
    return f"{name}_tokens.rank{rank:05d}.jsonl"


class TokenDumpError(RuntimeError):
    """A token dump directory that is incomplete or contradicts itself."""


def read_token_manifest(directory: str | Path, name: str = "motion") -> dict[str, Any]:
    """The dump's manifest (files, ``num_tokens``, ``num_codes``); raises if the dump is incomplete."""
    path = manifest_path(Path(directory), name)
    if not path.is_file():
        raise TokenDumpError(f"{path} does not exist: no finished '{name}' token dump in {directory}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise TokenDumpError(f"{path} is not a {FORMAT} manifest")
    return manifest


def read_token_dump(directory: str | Path, name: str = "motion") -> dict[tuple[str, int], list[int]]:
    """``{(key, clip_start): ids}`` of a finished dump.

    A clip found twice with the same ids (a video listed in two shards) is kept once; with different
    ids the dump is ambiguous and this raises.
    """
    directory = Path(directory)
    manifest = read_token_manifest(directory, name)
    field = f"{name}_ids"
    tokens: dict[tuple[str, int], list[int]] = {}
    records = 0
    for file_name in manifest["files"]:
        path = directory / file_name
        if not path.is_file():
            raise TokenDumpError(f"token dump {directory} lists {file_name}, which does not exist")
        with open(path) as lines:
            for number, line in enumerate(lines, 1):
                record = json.loads(line)
                clip = (record["key"], int(record["clip_start"]))
                ids = record[field]
                if clip in tokens and tokens[clip] != ids:
                    raise TokenDumpError(f"{path}:{number}: clip {clip} appears again with different ids")
                tokens[clip] = ids
                records += 1
    if records != manifest["clips"]:
        raise TokenDumpError(f"token dump {directory} holds {records} clips, its manifest says {manifest['clips']}")
    return tokens
