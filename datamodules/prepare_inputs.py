"""What ``prepare`` reads: loose video files (+ captions CSV or sidecar .txt) and video2dataset shards.

``list_inputs`` names every input file by its path relative to the input root: loose files (videos
and anything else, which is counted as ``not_a_video`` so the manifest accounts for every file) and
``.tar`` shards. Caption sidecars (``clip.txt``/``clip.json`` next to ``clip.mp4``) and the captions
CSV are not inputs. How inputs are grouped into units is ``prepare_plan``'s business; a ``Unit`` here
is one group, resolved against the input root.
"""

from __future__ import annotations

import csv
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from datamodules.sample_format import sanitize_key
from videolavit.video.errors import TRUNCATED_SHARD

VIDEO_EXTENSIONS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv",
                    ".3gp", ".ts", ".gif"}
ID_COLUMNS = ("videoid", "video_id", "id", "YoutubeID", "youtube_id", "key", "filename", "video")
CAPTION_COLUMNS = ("name", "caption", "Caption", "text", "title")
SIDECAR_EXTENSIONS = {".txt", ".json"}
NOT_A_VIDEO = "not_a_video"  # an input file whose extension is not a video's (e.g. audio-only .m4a)
DUPLICATE_ID = "duplicate_id"  # a video whose sample key another input already has (clip.mp4 and clip.webm)


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
    skip: tuple[str, str] | None = None  # (reason, detail) known without decoding


@dataclass
class Inputs:
    """Every input file under ``base``: loose files and tar shards (with their sizes), relative paths.
    ``duplicates``: loose videos whose sample key an earlier one (in sorted order, the value) already has."""

    base: Path
    loose: list[str]
    tars: dict[str, int]
    duplicates: dict[str, str] = field(default_factory=dict)


@dataclass
class Unit:
    """One group of inputs: loose files (absolute paths) or one video2dataset shard."""

    index: int
    name: str
    files: list[str] = field(default_factory=list)
    tar: str | None = None


def read_captions(path: str | Path, id_column: str | None = None, caption_column: str | None = None
                  ) -> dict[str, str]:
    """Captions by video id from a WebVid/InternVid-style CSV (columns detected unless given)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"captions file not found: {path}")
    try:
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
    except UnicodeDecodeError as exc:
        raise InputError(f"captions file {path} is not UTF-8 (byte 0x{exc.object[exc.start]:02x}); convert it "
                         "(e.g. iconv -f latin1 -t utf-8) and pass it as --captions") from None
    except csv.Error as exc:
        raise InputError(f"captions file {path} is not a readable CSV ({exc}); fix it or pass another --captions"
                         ) from None
    except OSError as exc:
        raise InputError(f"captions file {path} cannot be read: {exc.strerror or exc}; check --captions") from None


def _is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def _is_sidecar(path: Path, video_stems: set[Path]) -> bool:
    return path.suffix.lower() in SIDECAR_EXTENSIONS and path.with_suffix("") in video_stems


def list_inputs(videos: str | Path, exclude: Sequence[str | Path] = ()) -> Inputs:
    """Every input file of a directory (searched recursively) or of a single video / .tar file.

    ``exclude``: paths that are not inputs even when under the root (the output directory, the captions CSV).
    """
    root = Path(videos)
    if not root.exists():
        raise InputError(f"input path does not exist: {root}; check --videos")
    if root.is_file():
        if root.suffix == ".tar":
            return Inputs(base=root.parent, loose=[], tars={root.name: root.stat().st_size})
        if _is_video(root):
            return Inputs(base=root.parent, loose=[root.name], tars={})
        raise InputError(f"{root} is neither a video file, a .tar shard nor a directory; check --videos")
    base = root.resolve()
    excluded = [Path(p).resolve() for p in exclude]
    if any(p == base or p in base.parents for p in excluded):
        raise InputError(f"--videos {root} is the output directory or lies inside it; pass another --out")
    excluded_parts = [p.relative_to(base).parts for p in excluded if base in p.parents]
    files = []
    for path in sorted(root.rglob("*")):
        parts = path.relative_to(root).parts
        if path.is_file() and not any(parts[:len(e)] == e for e in excluded_parts):
            files.append(path)
    tars = [p for p in files if p.suffix == ".tar"]
    loose_videos = {p for p in files if _is_video(p)}
    if not tars and not loose_videos:
        raise InputError(f"no videos ({', '.join(sorted(VIDEO_EXTENSIONS))}) or .tar shards under {root}; "
                         "check --videos")
    stems = {p.with_suffix("") for p in loose_videos}
    loose = [p.relative_to(root).as_posix() for p in files if p.suffix != ".tar" and not _is_sidecar(p, stems)]
    keys: dict[str, str] = {}
    duplicates = {}
    for rel in loose:
        if _is_video(Path(rel)):
            first = keys.setdefault(sanitize_key(rel.rsplit(".", 1)[0]), rel)
            if first != rel:
                duplicates[rel] = first
    return Inputs(base=root, loose=loose, tars={p.relative_to(root).as_posix(): p.stat().st_size for p in tars},
                  duplicates=duplicates)


def select_part(units: list[Unit], part: int, num_parts: int) -> list[Unit]:
    if not 0 <= part < num_parts:
        raise InputError(f"--part {part}/{num_parts}: need 0 <= i < N")
    return [u for u in units if u.index % num_parts == part]


def _sidecar_caption(path: Path) -> str | None:
    sidecar = path.with_suffix(".txt")
    return sidecar.read_bytes().decode("utf-8", "replace").strip() if sidecar.is_file() else None


def iter_unit_items(unit: Unit, base: str | Path, captions: dict[str, str] | None,
                    duplicates: dict[str, str] | None = None) -> Iterator[InputItem]:
    """Yield the unit's inputs with their captions (``caption`` None when none was found); a loose file
    that is not a video, or whose key an earlier video has (``duplicates``), comes with its ``skip`` set."""
    base = Path(base)
    for name in unit.files:
        path = Path(name)
        if not _is_video(path):
            rel = path.relative_to(base).as_posix()
            yield InputItem(source_id=rel, path=str(path), skip=(NOT_A_VIDEO, f"extension {path.suffix or '(none)'!r}"))
            continue
        if duplicates and path.relative_to(base).as_posix() in duplicates:
            rel = path.relative_to(base).as_posix()
            yield InputItem(source_id=rel, path=str(path),
                            skip=(DUPLICATE_ID, f"same sample key as {duplicates[rel]}"))
            continue
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
            yield InputItem(source_id=key, data=None, skip=(TRUNCATED_SHARD, key.split(":", 2)[-1]))
            continue
        members = groups[key]
        video_ext = next((e for e in members if "." + e in VIDEO_EXTENSIONS), None)
        if video_ext is None:
            yield InputItem(source_id=key, skip=(NOT_A_VIDEO, f"members {sorted(members)} of {Path(path).name}"))
            continue
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
        yield InputItem(source_id=key, data=members[video_ext],
                        caption=caption, caption_source=source,
                        source_meta={"shard": Path(path).name, **({"video2dataset": meta} if meta else {})})


def read_bytes(item: InputItem) -> bytes | str:
    """What the decomposer should open: a path (read lazily by FFmpeg) or in-memory bytes."""
    return item.path if item.path is not None else (item.data or b"")
