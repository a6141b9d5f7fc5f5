"""What ``prepare`` reads: loose video files (+ captions CSV or sidecar .txt) and video2dataset shards.

Inputs are grouped into *units*, the grain of parallel fan-out (``--part i/N``) and of resumption:
each input tar is one unit (video2dataset already shards its output), loose videos are grouped in
sorted order into units of ``videos_per_unit``. Unit numbering depends only on the input listing, so
every part of a cluster job computes the same units.
"""

from __future__ import annotations

import csv
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv",
                    ".3gp", ".ts", ".gif"}
ID_COLUMNS = ("videoid", "video_id", "id", "YoutubeID", "youtube_id", "key", "filename", "video")
CAPTION_COLUMNS = ("name", "caption", "Caption", "text", "title")


class InputError(ValueError):
    """The inputs of ``prepare`` cannot be used (raised before any work starts)."""


@dataclass
class InputItem:
    """One source video: a file path, or bytes already read from an input shard."""

    source_id: str
    path: str | None = None
    data: bytes | None = None
    caption: str | None = None
    caption_source: str | None = None
    source_meta: dict = field(default_factory=dict)


@dataclass
class Unit:
    index: int
    name: str
    files: list[str] = field(default_factory=list)  # loose video paths
    tar: str | None = None  # or one video2dataset shard


def read_captions(path: str | Path, id_column: str | None = None, caption_column: str | None = None
                  ) -> dict[str, str]:
    """Captions by video id from a WebVid/InternVid-style CSV (columns detected unless given)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"captions file not found: {path}")
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        id_col = id_column or next((c for c in ID_COLUMNS if c in columns), None)
        cap_col = caption_column or next((c for c in CAPTION_COLUMNS if c in columns), None)
        for wanted, name, options in ((id_col, "--id-column", ID_COLUMNS), (cap_col, "--caption-column",
                                                                             CAPTION_COLUMNS)):
            if wanted is None or wanted not in columns:
                raise InputError(f"{path}: no usable column for {name} (columns: {columns}; "
                                 f"tried {list(options)}); pass {name}")
        return {str(row[id_col]).strip(): row[cap_col] for row in reader if row.get(cap_col)}


def _is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def list_units(videos: str | Path, videos_per_unit: int = 256) -> list[Unit]:
    """Units over a directory of videos and/or .tar shards, or a single .tar file."""
    root = Path(videos)
    if not root.exists():
        raise InputError(f"input path does not exist: {root}")
    if root.is_file():
        if root.suffix == ".tar":
            return [Unit(index=0, name=root.stem, tar=str(root))]
        if _is_video(root):
            return [Unit(index=0, name="videos-000000", files=[str(root)])]
        raise InputError(f"{root} is neither a video file, a .tar shard nor a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    tars = [p for p in files if p.suffix == ".tar"]
    loose = [p for p in files if _is_video(p)]
    if not tars and not loose:
        raise InputError(f"no videos ({', '.join(sorted(VIDEO_EXTENSIONS))}) or .tar shards under {root}")
    units = [Unit(index=0, name=f"tar-{p.relative_to(root).with_suffix('').as_posix().replace('/', '__')}",
                  tar=str(p)) for p in tars]
    for start in range(0, len(loose), videos_per_unit):
        units.append(Unit(index=0, name=f"videos-{start // videos_per_unit:06d}",
                          files=[str(p) for p in loose[start:start + videos_per_unit]]))
    for index, unit in enumerate(units):
        unit.index = index
    return units


def select_part(units: list[Unit], part: int, num_parts: int) -> list[Unit]:
    if not 0 <= part < num_parts:
        raise InputError(f"--part {part}/{num_parts}: need 0 <= i < N")
    return [u for u in units if u.index % num_parts == part]


def _sidecar_caption(path: Path) -> str | None:
    sidecar = path.with_suffix(".txt")
    return sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else None


def iter_unit_items(unit: Unit, root: str | Path, captions: dict[str, str] | None) -> Iterator[InputItem]:
    """Yield the unit's videos with their captions (``caption`` None when none was found)."""
    root = Path(root)
    base = root if root.is_dir() else root.parent
    for name in unit.files:
        path = Path(name)
        rel = path.relative_to(base).with_suffix("").as_posix()
        caption, source = None, None
        if captions is not None:
            caption = captions.get(rel, captions.get(path.stem))
            source = "csv" if caption is not None else None
        if caption is None:
            caption = _sidecar_caption(path)
            source = "sidecar" if caption is not None else None
        yield InputItem(source_id=rel, path=str(path), caption=caption, caption_source=source)
    if unit.tar is not None:
        yield from _iter_tar(unit.tar, captions)


def _iter_tar(path: str, captions: dict[str, str] | None) -> Iterator[InputItem]:
    """video2dataset-style samples (``key.mp4`` + ``key.txt`` + ``key.json``) of one tar.

    A tar that ends early yields the samples it holds in full; the damage (and the sample it cut) is
    reported as a final item without video bytes so the caller counts it.
    """
    groups: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, mode="r") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                stem, _, ext = Path(member.name).name.partition(".")
                key = str(Path(member.name).parent / stem) if Path(member.name).parent != Path(".") else stem
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        # The sample being read when the tar broke may lack members: it is lost to the truncation.
        cut = order.pop() if order else "-"
        order.append(f"__truncated__:{Path(path).name}/{cut}:{type(exc).__name__}: {exc}")
    for key in order:
        if key.startswith("__truncated__:"):
            yield InputItem(source_id=key, data=None, source_meta={"truncated_tar": path})
            continue
        members = groups[key]
        video_ext = next((e for e in members if "." + e in VIDEO_EXTENSIONS), None)
        meta = {}
        if "json" in members:
            try:
                meta = json.loads(members["json"])
            except ValueError:
                meta = {}
        caption, source = None, None
        if "txt" in members:
            caption, source = members["txt"].decode("utf-8", "replace").strip(), "shard"
        elif captions is not None:
            caption = captions.get(key) or captions.get(str(meta.get("videoid", meta.get("key", ""))))
            source = "csv" if caption is not None else None
        yield InputItem(source_id=key, data=members.get(video_ext, b"") if video_ext else b"",
                        caption=caption, caption_source=source,
                        source_meta={"shard": Path(path).name, **({"video2dataset": meta} if meta else {})})


def read_bytes(item: InputItem) -> bytes | str:
    """What the decomposer should open: a path (read lazily by FFmpeg) or in-memory bytes."""
    return item.path if item.path is not None else (item.data or b"")
