"""Reading shard tars into samples without losing data silently.

Python's ``tarfile`` stream mode (and so webdataset's tar expander) simply stops at a truncated
archive or at a damaged member header: the samples after it vanish without an error. This reader
parses the tar stream itself: it checks every header's checksum and every member's length, steps over
a damaged header to the next intact one, and checks that the archive ends with tar's zero blocks.
Every loss is counted, with the shard URL and the key:

* a sample that lost a member to a damaged header is dropped as ``corrupt_member``;
* a cut shard (or one that cannot be opened) is ``truncated_shard``.

Where the shard's directory has a ``manifest.json`` with per-shard sample counts (``prepare`` writes
them), a shard's loss is counted per lost sample: the manifest's count less the samples that arrived
and those already counted one by one. Without one the number lost after a cut is unknown, and the shard
counts once.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

from webdataset.gopen import gopen

from datamodules.sample_format import FIELDS
from datamodules.skip_tracker import SKIPS
from videolavit.video import errors

BLOCK = 512
CORRUPT_MEMBER = "corrupt_member"  # skip reason: a member header in the shard is damaged
MANIFEST = "manifest.json"


class _Cut(Exception):
    """The archive ends inside a header or a member."""


class _Damage:
    """Marks, in the member stream, a run of blocks that are neither headers nor member data."""

    def __init__(self, offset: int):
        self.offset = offset


def _number(field: bytes) -> int:
    """A tar numeric field: octal text, or base-256 when the high bit is set; ValueError if neither."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    return int(text, 8) if text else 0


def _header_ok(block: bytes) -> bool:
    """Whether a 512-byte block is a tar header: its checksum field matches the block's byte sum."""
    try:
        stored = _number(block[148:156])
    except ValueError:
        return False
    rest = block[:148] + block[156:]
    unsigned = sum(rest) + 8 * 0x20  # the checksum field itself counts as spaces
    signed = unsigned - 256 * sum(1 for byte in rest if byte > 127)
    return stored in (unsigned, signed)


def _pax_records(data: bytes) -> dict[str, str]:
    """Records (``"<len> key=value\\n"``) of a pax extended header, e.g. ``path`` and ``size``."""
    records = {}
    while data:
        length = data.partition(b" ")[0]
        size = int(length)
        key, _, value = data[len(length) + 1:size - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        data = data[size:]
    return records


def _ustar_name(block: bytes) -> str:
    name = block[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    if block[257:263] == b"ustar\0":
        prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        if prefix:
            name = f"{prefix}/{name}"
    return name


class _TarStream:
    """Regular members of a tar stream as ``(name, bytes)``, stepping over damaged headers.

    ``tarfile`` cannot resynchronise a stream after a bad header; this reader moves on block by block
    to the next block that is a valid header, yielding one ``_Damage`` marker per damaged run.
    ``ended_cleanly`` tells a complete archive (its last block is a zero block) from a cut one.
    """

    def __init__(self, stream):
        self.stream, self.offset, self.last_block_zero = stream, 0, False

    def _read(self, size: int) -> bytes:
        chunks, left = [], size
        while left > 0:  # pipes return short reads
            chunk = self.stream.read(left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        self.offset += len(data)
        return data

    def members(self) -> Iterator["tuple[str, bytes] | _Damage"]:
        pax: dict[str, str] = {}
        long_name: str | None = None
        in_damage = False
        while True:
            block = self._read(BLOCK)
            if not block:
                return
            if len(block) < BLOCK:
                raise _Cut("inside a header")
            if not any(block):
                self.last_block_zero, in_damage = True, False
                continue
            self.last_block_zero = False
            if not _header_ok(block):
                if not in_damage:
                    yield _Damage(self.offset - BLOCK)
                in_damage, pax, long_name = True, {}, None  # what a damaged header described is lost
                continue
            in_damage = False
            kind = block[156:157]
            size = _number(block[124:136])
            if "size" in pax and pax["size"].isdigit():
                size = int(pax["size"])
            data = self._read(-(-size // BLOCK) * BLOCK)
            if len(data) < size:
                raise _Cut(f"inside a member ({len(data)} of {size} bytes)")
            data = data[:size]
            if kind == b"x":  # pax header of the next member
                try:
                    pax = _pax_records(data)
                except ValueError:
                    pax = {}
                continue
            if kind == b"L":  # GNU long name of the next member
                long_name = data.rstrip(b"\0").decode("utf-8", "replace")
                continue
            name = pax.get("path") or long_name or _ustar_name(block)
            pax, long_name = {}, None
            if kind in (b"0", b"\0", b"7"):  # regular files; directories, links, global headers are not samples
                yield name, data

    def ended_cleanly(self) -> bool:
        return self.last_block_zero


@functools.lru_cache(maxsize=64)
def _manifest_counts(manifest: str, mtime_ns: int) -> dict[str, int]:
    try:
        data = json.loads(Path(manifest).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    counts = data.get("shard_samples")
    if not isinstance(counts, dict):
        counts = {s.get("name"): s.get("samples") for s in data.get("shards") or [] if isinstance(s, dict)}
    return {str(name): n for name, n in counts.items() if isinstance(n, int) and not isinstance(n, bool)}


def expected_samples(url: str) -> int | None:
    """Samples the manifest next to a local shard says it holds (None: no manifest, or not listed)."""
    if "://" in url or url.startswith("pipe:"):
        return None
    path = Path(url)
    manifest = path.parent / MANIFEST
    try:
        mtime = manifest.stat().st_mtime_ns
    except OSError:
        return None
    return _manifest_counts(str(manifest), mtime).get(path.name)


def _split_name(name: str) -> tuple[str, str]:
    path = PurePosixPath(name)
    stem, _, ext = path.name.partition(".")
    prefix = str(path.parent) if str(path.parent) != "." else ""
    return (f"{prefix}/{stem}" if prefix else stem), ext


def iter_tar_samples(url: str, required: tuple[str, ...] = FIELDS) -> Iterator[dict]:
    """Samples (``{"__key__", "__url__", ext: bytes}``) of one shard; losses are counted (module doc)."""
    expected = expected_samples(url)
    try:
        raw = gopen(url, "rb")
    except Exception as exc:  # missing object, failed pipe: count it, keep the job alive
        SKIPS.record(url, errors.TRUNCATED_SHARD, f"cannot open: {type(exc).__name__}: {exc}",
                     count=expected or 1)
        return
    tar = _TarStream(raw)
    pending: dict | None = None  # the sample being assembled
    suspect = False  # whether the pending sample is next to a damaged header
    damage_before = False  # a damaged header came before the next sample's first member
    damaged = False
    lost = None  # where the shard was cut, if it was
    delivered, dropped = 0, 0

    shard_fields: set[str] = set()  # members of this shard's intact samples (video and token shards differ)

    def needed() -> set[str]:
        """The members a sample of this shard must have: those its intact samples had, else ``required``."""
        return shard_fields or set(required)

    def keep(sample: dict, near_damage: bool) -> bool:
        """Whether to yield ``sample``: one next to damage that lacks a member is counted and dropped."""
        nonlocal dropped
        missing = sorted(needed() - sample.keys())
        if near_damage and missing:
            dropped += 1
            SKIPS.record(f"{url}:{sample['__key__']}", CORRUPT_MEMBER, f"a damaged member header took its {missing}")
            return False
        if not near_damage:
            shard_fields.update(name for name in sample if not name.startswith("__"))
        return True

    try:
        for item in tar.members():
            if isinstance(item, _Damage):
                damaged = True
                suspect = pending is not None  # the damaged member may have been its last one ...
                damage_before = True  # ... or the first one of the next sample
                continue
            key, ext = _split_name(item[0])
            if pending is not None and pending["__key__"] != key:
                if keep(pending, suspect):
                    delivered += 1
                    yield pending
                pending, suspect = None, False
            if damage_before:
                suspect, damage_before = True, False
            pending = pending or {"__key__": key, "__url__": url}
            pending[ext] = item[1]
        if not tar.ended_cleanly():
            lost = f"after {pending['__key__']}" if pending is not None else "-"
    except _Cut as cut:
        lost = f"{pending['__key__'] if pending else '-'} (cut {cut})"
    except OSError as exc:
        lost = f"{pending['__key__'] if pending else '-'} ({type(exc).__name__}: {exc})"
    try:
        raw.close()  # a pipe: command reports its failure (non-zero exit) here
    except Exception as exc:
        lost = lost or "-"
        lost += f" (close: {type(exc).__name__}: {exc})"
    if pending is not None:
        if lost is not None and not needed() <= pending.keys():
            pass  # the cut sample: counted with the cut below
        elif keep(pending, suspect or damage_before):
            delivered += 1
            yield pending
    _count_shortfall(url, expected, delivered, dropped, lost, damaged)


def _count_shortfall(url: str, expected: int | None, delivered: int, dropped: int, lost: str | None,
                     damaged: bool) -> None:
    """Count the samples of a shard that neither arrived nor were already counted one by one."""
    reason = errors.TRUNCATED_SHARD if lost is not None else CORRUPT_MEMBER
    where = f"{url}:{lost}" if lost is not None else url
    if expected is not None:
        missing = expected - delivered - dropped
        if missing > 0:
            SKIPS.record(where, reason, f"{missing} of the manifest's {expected} samples did not arrive",
                         count=missing)
        return
    if lost is not None:
        SKIPS.record(where, reason, "shard ends early; samples after the cut are lost (how many is unknown: "
                                    "no manifest count for this shard)")
    elif damaged and not dropped:
        SKIPS.record(where, reason, "a member header is damaged; how many samples it held is unknown "
                                    "(no manifest count for this shard)")


def tar_samples(shards: Iterable[dict]) -> Iterator[dict]:
    """Pipeline stage: shard dicts (``{"url": ...}``) → samples."""
    for shard in shards:
        yield from iter_tar_samples(shard["url"])
