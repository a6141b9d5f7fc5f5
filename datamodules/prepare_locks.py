"""Who works on a ``prepare`` output directory: POSIX record locks on one file, ``OUT/.units/lock``.

Byte 0 serialises planning and manifest writing (held briefly, waited for). Byte 1 is held shared by
every running ``prepare`` and exclusively by one that changes the unit plan, so a plan never changes
under a running part. Byte ``2 + i`` claims unit ``i`` for the run that owns it, so two runs of the
same ``--part`` (or of overlapping parts) cannot both write a unit. Record locks belong to the process:
the OS drops them when it dies, SIGKILL included, so a killed run never blocks the next one, and
forked decoder workers do not inherit them.
"""

from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from datamodules.prepare_inputs import InputError

LOCK_FILE = "lock"
_PLANNING, _ACTIVE, _FIRST_UNIT = 0, 1, 2
_BUSY = (errno.EACCES, errno.EAGAIN)


class PrepareBusyError(InputError):
    """Another ``prepare`` is working on the same output directory in a way that conflicts with this run."""


class OutputLocks:
    """The locks of one run on one output directory; ``close`` (or the process's death) drops them all.

    Open it once per process and directory: closing any descriptor of the lock file drops the process's
    record locks on it.
    """

    def __init__(self, units_dir: Path):
        self.path = Path(units_dir) / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def _lock(self, mode: int, offset: int, wait: bool = False) -> bool:
        try:
            fcntl.lockf(self.fd, mode if wait else mode | fcntl.LOCK_NB, 1, offset)
        except OSError as exc:
            if exc.errno in _BUSY and not wait:
                return False
            raise InputError(f"cannot lock {self.path} ({exc.strerror}); put --out on a file system with POSIX "
                             "record locks") from None
        return True

    @contextmanager
    def planning(self) -> Iterator[None]:
        """Held while the plan is read or changed and while the manifest is written."""
        self._lock(fcntl.LOCK_EX, _PLANNING, wait=True)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, _PLANNING)

    def try_exclusive(self) -> bool:
        """True when no other run is active (then this one may change the plan; call ``hold_shared`` after)."""
        return self._lock(fcntl.LOCK_EX, _ACTIVE)

    def hold_shared(self) -> None:
        """Mark this run active for its whole duration (converts an exclusive hold)."""
        if not self._lock(fcntl.LOCK_SH, _ACTIVE):
            raise PrepareBusyError(f"{self.path.parent.parent}: another prepare is changing its unit plan; "
                                   "rerun when it has finished")

    def claim_units(self, indices: Iterable[int]) -> int | None:
        """Claim the units for this run; returns the first index another run holds (None: all claimed)."""
        for index in indices:
            if not self._lock(fcntl.LOCK_EX, _FIRST_UNIT + index):
                return index
        return None

    def close(self) -> None:
        os.close(self.fd)
