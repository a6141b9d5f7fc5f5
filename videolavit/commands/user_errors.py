"""User errors of the tool subcommands: one line on stderr naming what is wrong and what to set, exit code 2.

Commands check their arguments before any model is loaded or anything generated (:func:`check_range`,
:func:`check_output_file`, :func:`check_output_dir`, :func:`check_input_file`), raising
:class:`UsageError`; ``run`` turns it, and the named errors of the libraries it calls (missing or corrupt
exports, unreadable videos), into :func:`fail`'s one line. ``python -m videolavit`` catches a
``UsageError`` that escapes a command the same way.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path


class UsageError(ValueError):
    """A command-line value that cannot work; the message names the flag and what to set instead."""


def one_line(error: BaseException | str) -> str:
    """The message of ``error`` on one line (library messages may span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def fail(error: BaseException | str) -> int:
    """Print ``error: <message>`` on stderr and return the exit code of a user error (2)."""
    print(f"error: {one_line(error)}", file=sys.stderr)
    return 2


def check_range(flag: str, value: float | None, low: float | None = None, high: float | None = None,
                *, low_inclusive: bool = True) -> None:
    """``value`` (None: not given, fine) must be finite and within ``[low, high]`` (``(low, high]`` when
    ``low_inclusive`` is False)."""
    if value is None:
        return
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and value > high
    if not math.isfinite(value) or too_low or too_high:
        lower = "" if low is None else f"{'>=' if low_inclusive else '>'} {low:g}"
        upper = "" if high is None else f"<= {high:g}"
        raise UsageError(f"{flag} must be {' and '.join(p for p in (lower, upper) if p)}, got {value:g}")


def _probe_writable(directory: Path, flag: str) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise UsageError(f"{flag}: directory {directory} is not writable ({error.strerror or error}); "
                         f"set {flag} to a writable location") from None


def check_output_file(flag: str, path: str | Path) -> Path:
    """An output file that can be written: its directory exists (created if missing) and accepts a new file,
    and ``path`` is not a directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; set {flag} to a file path")
    if path.exists() and not _writable_file(path):
        raise UsageError(f"{flag} {path} exists and is not writable; set {flag} to a writable file path")
    _probe_writable(path.parent, flag)
    return path


def check_output_dir(flag: str, path: str | Path) -> Path:
    """An output directory that exists (created if missing) and accepts new files."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a directory; set {flag} to a directory")
    _probe_writable(path, flag)
    return path


def check_input_file(flag: str, path: str | Path, what: str = "file") -> Path:
    """An existing, readable regular file."""
    path = Path(path).expanduser()
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise UsageError(f"{flag} {path} {problem}; set {flag} to an existing {what}")
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise UsageError(f"{flag} {path} cannot be read ({error.strerror or error})") from None
    return path


def check_input_dir(flag: str, path: str | Path, what: str = "directory") -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UsageError(f"{flag} {path} is not a directory; set {flag} to an existing {what}")
    return path


def read_text_file(flag: str, path: str | Path) -> str:
    """The UTF-8 text of an input file, or a :class:`UsageError` saying why it cannot be read."""
    path = check_input_file(flag, path, "UTF-8 text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(f"{flag} {path} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None


def _writable_file(path: Path) -> bool:
    try:
        with open(path, "ab"):
            return True
    except OSError:
        return False
