"""The files of one chain: the current file and its rotated siblings, how they are named, rotated and read.

A rotated file is named `<name>.<UTC time>` with a fixed-width suffix, so name order is chain order; rotate()
keeps that true even when the clock repeats or steps back.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from lkm.fsutil import fsync_dir

__all__ = ["chain_files", "last_line", "rotate", "rotated_files", "utc_now"]

_ROTATED_FORMAT: Final = "%Y%m%dT%H%M%S%fZ"
_READ_BLOCK: Final = 64 * 1024


def utc_now() -> datetime:
    """The default clock of rotation; tests inject their own."""
    return datetime.now(UTC)


def rotated_files(path: Path) -> list[Path]:
    """`path`'s rotated siblings, oldest first: the fixed-width UTC suffix makes name order chain order."""
    pattern = re.compile(re.escape(path.name) + r"\.\d{8}T\d{12}Z\Z")
    try:
        names = os.listdir(path.parent)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [path.parent / name for name in sorted(n for n in names if pattern.match(n))]


def chain_files(path: Path) -> list[Path]:
    """Every file of the chain, oldest first, the current file last."""
    files = rotated_files(path)
    if path.exists():
        files.append(path)
    return files


def _suffix_time(rotated: Path) -> datetime:
    return datetime.strptime(rotated.name.rsplit(".", 1)[1], _ROTATED_FORMAT).replace(tzinfo=UTC)


def rotate(path: Path, *, keep_files: int, clock: Callable[[], datetime] = utc_now) -> Path:
    """Renames the current file to its rotated name and prunes all but the newest `keep_files` (0: keep all).

    The caller holds the chain's lock and has closed the file.
    """
    existing = rotated_files(path)
    stamp = clock().astimezone(UTC)
    if existing:
        # Names must sort in chain order even if the clock steps back or two rotations share a tick.
        newest = _suffix_time(existing[-1])
        if stamp <= newest:
            stamp = newest + timedelta(microseconds=1)
    target = path.with_name(f"{path.name}.{stamp.strftime(_ROTATED_FORMAT)}")
    os.rename(path, target)
    fsync_dir(path.parent)
    if keep_files > 0:
        doomed = [*existing, target][:-keep_files]
        for old in doomed:
            old.unlink(missing_ok=True)
        if doomed:
            fsync_dir(path.parent)
    return target


def last_line(path: Path) -> tuple[bytes | None, int, int]:
    """(last complete line without its newline, size up to and including its newline, file size).

    Reads backwards so the cost does not grow with the file.
    """
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        pos = size
        buf = b""
        while pos > 0 and buf.count(b"\n") < 2:
            step = min(_READ_BLOCK, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
    last_nl = buf.rfind(b"\n")
    if last_nl < 0:
        return None, 0, size
    start = buf.rfind(b"\n", 0, last_nl) + 1
    return buf[start:last_nl], pos + last_nl + 1, size
