"""Files that appear whole or not at all, with the permissions a new file normally gets.

A writer that fails or is killed must leave the previous file intact and no debris elsewhere: its partial
output is a hidden file next to the destination (same directory, so the final ``os.replace`` is atomic and
nothing accumulates in ``$TMPDIR``), removed when the write fails. Python's ``tempfile`` and safetensors'
own atomic writes create 0600 files, which a team sharing a run directory cannot read; the files written
here get the mode the umask gives any new file (0644 under umask 022).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


def partial_path(path: str | Path) -> Path:
    """The hidden sibling a write of ``path`` goes to first: ``.{name}.{random}.partial``."""
    path = Path(path)
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{PARTIAL_SUFFIX}")


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a hidden path next to ``path`` to write; on success it replaces ``path``, on failure it is removed.

    The writer may write the yielded file in place or replace it (as safetensors does); either way the
    result gets the umask's mode for a new file and is flushed to disk before it takes ``path``'s place.
    """
    path = Path(path)
    tmp = partial_path(path)
    # Created with 0666 so the kernel applies the umask: this is the mode the final file must have.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        yield tmp
        os.chmod(tmp, mode)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_file`; returns ``path``."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
