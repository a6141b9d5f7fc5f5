"""Reading shard tars into samples without losing data silently.

Python's ``tarfile`` stream mode (and so webdataset's tar expander) simply stops at a truncated
archive: the samples after the cut vanish without an error. This reader checks every member's length
and that the archive ends with tar's zero blocks; a cut shard yields its intact samples and the loss
is recorded (with the shard URL and the key of the cut sample) as ``truncated_shard``.
"""

from __future__ import annotations

import tarfile
from pathlib import PurePosixPath
from typing import Iterable, Iterator

from webdataset.gopen import gopen

from datamodules.sample_format import FIELDS
from datamodules.skip_tracker import SKIPS
from videolavit.video import errors

BLOCK = 512


class _TailTrackingReader:
    """File wrapper remembering the last bytes read, to tell a clean tar end from a cut."""

    def __init__(self, stream):
        self.stream, self.tail = stream, b""

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        if data:
            self.tail = (self.tail + data)[-2 * BLOCK:]
        return data

    def drain(self) -> None:
        while self.read(1 << 16):
            pass

    def ended_cleanly(self) -> bool:
        return len(self.tail) >= BLOCK and not any(self.tail[-BLOCK:])


def _split_name(name: str) -> tuple[str, str]:
    path = PurePosixPath(name)
    stem, _, ext = path.name.partition(".")
    prefix = str(path.parent) if str(path.parent) != "." else ""
    return (f"{prefix}/{stem}" if prefix else stem), ext


def iter_tar_samples(url: str, required: tuple[str, ...] = FIELDS) -> Iterator[dict]:
    """Samples (``{"__key__", "__url__", ext: bytes}``) of one shard, checking for truncation."""
    try:
        raw = gopen(url, "rb")
    except Exception as exc:  # missing object, failed pipe: count it, keep the job alive
        SKIPS.record(url, errors.TRUNCATED_SHARD, f"cannot open: {type(exc).__name__}: {exc}")
        return
    reader = _TailTrackingReader(raw)
    pending: dict | None = None  # the sample being assembled
    lost = None  # where the shard was cut, if it was
    try:
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, ext = _split_name(member.name)
                if pending is not None and pending["__key__"] != key:
                    yield pending
                    pending = None
                data = tar.extractfile(member).read()
                if len(data) != member.size:  # a short member is never kept
                    lost = key
                    break
                pending = pending or {"__key__": key, "__url__": url}
                pending[ext] = data
        reader.drain()
        if lost is None and not reader.ended_cleanly():
            lost = f"after {pending['__key__']}" if pending is not None else "-"
    except (tarfile.TarError, OSError, EOFError) as exc:
        lost = f"{pending['__key__'] if pending else '-'} ({type(exc).__name__}: {exc})"
    try:
        raw.close()  # a pipe: command reports its failure (non-zero exit) here
    except Exception as exc:
        lost = lost or "-"
        lost += f" (close: {type(exc).__name__}: {exc})"
    if pending is not None and (lost is None or all(f in pending for f in required)):
        yield pending
    if lost is not None:
        SKIPS.record(f"{url}:{lost}", errors.TRUNCATED_SHARD, "shard ends early; samples after the cut are lost")


def tar_samples(shards: Iterable[dict]) -> Iterator[dict]:
    """Pipeline stage: shard dicts (``{"url": ...}``) → samples."""
    for shard in shards:
        yield from iter_tar_samples(shard["url"])
