"""Durable file writes: a crash at any point leaves the old file or the new one, never a torn one."""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written: one call may write less than asked."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


TEMP_MARK = ".tmp-"
ORPHAN_AGE_SECONDS = 60.0
"""A temp file without a writer's pid in its name is taken as orphaned once it is this old."""


def _write_temp(directory: Path, name: str, data: bytes, mode: int) -> Path:
    # The writer's pid in the name lets remove_orphaned_temps tell a crashed writer's file from a live one's.
    tmp = directory / f".{name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(6)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not widen or narrow what we ask for
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replaces `path` with `data`: temp file, fsync, rename, directory fsync."""
    tmp = _write_temp(path.parent, path.name, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_create(path: Path, data: bytes, *, mode: int = 0o600) -> bool:
    """Like atomic_write, but never replaces: False when `path` already exists."""
    tmp = _write_temp(path.parent, path.name, data, mode)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphaned_temps(directory: Path) -> int:
    """Removes the temp files of writers that died before their rename (kill -9, power loss); returns how many.

    A temp file of a live process is left alone, so calling this while others write is safe.
    """
    removed = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not (entry.name.startswith(".") and TEMP_MARK in entry.name) or not entry.is_file(follow_symlinks=False):
            continue
        tail = entry.name.rsplit(TEMP_MARK, 1)[1]
        pid_text, _, _ = tail.partition("-")
        try:
            if pid_text.isdigit() and "-" in tail:
                if int(pid_text) != os.getpid() and _alive(int(pid_text)):
                    continue
            elif time.time() - entry.stat(follow_symlinks=False).st_mtime < ORPHAN_AGE_SECONDS:
                continue
            os.unlink(entry.path)
            removed += 1
        except FileNotFoundError:
            continue
    return removed


def ensure_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def loose_permissions(path: Path) -> str | None:
    """A description of what lets others in, or None when only the owner can read and write."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"{path} has mode {stat.S_IMODE(mode):04o}; expected no access for group or others (chmod 700)"
    return None


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock shared by every lkm process (server, CLI) on this file."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
