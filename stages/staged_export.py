"""Writing an export so that a failure leaves the previous one as it was.

The writer fills a fresh scratch directory next to ``export_dir`` (same file system, so the moves below are
renames); only when it has finished are its files moved into ``export_dir``, each with ``os.replace``. A stage
that raises halfway (a refused non-finite tensor, a full disk, a kill) therefore leaves the old export whole.
Files are moved one by one instead of swapping the directory, because several stages may export into one
directory (the tiny recipes share ``runs/tiny/exports``) and each must replace only its own files.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_staged(directory: str | Path, write: Callable[[Path], None], replaces: tuple[str, ...] = ()) -> list[Path]:
    """Run ``write(scratch_dir)`` and move what it wrote into ``directory``; returns the files' new paths.
    Files of ``directory`` matching a glob of ``replaces`` that the write did not produce are removed."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.incoming-", dir=target.parent))
    try:
        write(scratch)
        target.mkdir(parents=True, exist_ok=True)
        moved = []
        for path in sorted(scratch.rglob("*")):
            if path.is_dir():
                continue
            dest = target / path.relative_to(scratch)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)
            moved.append(dest)
        written = set(moved)
        for pattern in replaces:
            for stale in target.glob(pattern):
                if stale.is_file() and stale not in written:
                    stale.unlink()
        return moved
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
