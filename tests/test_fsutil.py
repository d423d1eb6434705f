"""Durable writes: the new bytes or the old ones, with the mode asked for, and no temporary file left behind;
what a writer killed before its rename leaves is removed later, a live writer's file is not."""

from __future__ import annotations

import multiprocessing
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lkm import fsutil


def _leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".tmp-" in p.name]


def test_atomic_write_replaces_with_the_requested_mode(tmp_path: Path) -> None:
    target = tmp_path / "key.json"
    target.write_bytes(b"old")
    old_umask = os.umask(0o077)
    try:
        fsutil.atomic_write(target, b"new", mode=0o640)
    finally:
        os.umask(old_umask)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert _leftovers(tmp_path) == []


def test_atomic_create_never_replaces(tmp_path: Path) -> None:
    target = tmp_path / "key.json"
    assert fsutil.atomic_create(target, b"first") is True
    assert fsutil.atomic_create(target, b"second") is False
    assert target.read_bytes() == b"first"
    assert _leftovers(tmp_path) == []


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "missing-dir" / "key.json"
    try:
        fsutil.atomic_write(target, b"x")
    except FileNotFoundError:
        pass
    else:
        raise AssertionError("writing into a missing directory must fail")
    assert not target.exists()


def test_write_all_writes_more_than_one_pipe_buffer(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024)
    path = tmp_path / "big"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fsutil.write_all(fd, data)
    finally:
        os.close(fd)
    assert path.read_bytes() == data


def test_loose_permissions_are_named(tmp_path: Path) -> None:
    directory = tmp_path / "store"
    fsutil.ensure_private_dir(directory)
    assert fsutil.loose_permissions(directory) is None
    directory.chmod(0o750)
    assert "0750" in (fsutil.loose_permissions(directory) or "")


def _hold_then_write(lock: str, out: str, ready: multiprocessing.synchronize.Event) -> None:
    with fsutil.file_lock(Path(lock)):
        ready.set()
        Path(out).write_text("child")


@pytest.mark.slow
def test_file_lock_excludes_another_process(tmp_path: Path) -> None:
    lock, out = tmp_path / ".lock", tmp_path / "out"
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    with fsutil.file_lock(lock):
        child = ctx.Process(target=_hold_then_write, args=(str(lock), str(out), ready))
        child.start()
        assert not ready.wait(0.5)  # the child is blocked on the lock we hold
        assert not out.exists()
    child.join(10)
    assert child.exitcode == 0 and out.read_text() == "child"


def test_orphaned_temps_go_and_live_ones_stay(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    orphan = tmp_path / f".hawk.json.tmp-{dead.stdout.strip()}-abcdef"
    live = tmp_path / f".hawk.json.tmp-{os.getppid()}-abcdef"  # our parent is alive
    old_style = tmp_path / ".key.json.tmp-0123456789ab"
    young_old_style = tmp_path / ".other.json.tmp-ba9876543210"
    keep = tmp_path / "key.json"
    for path in (orphan, live, old_style, young_old_style, keep):
        path.write_bytes(b"x")
    os.utime(old_style, (1, 1))
    assert fsutil.remove_orphaned_temps(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, young_old_style.name, keep.name])


def test_a_write_leaves_no_temp(tmp_path: Path) -> None:
    fsutil.atomic_write(tmp_path / "f", b"data")
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
