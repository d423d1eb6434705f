"""lkm.audit.appender: the durable append, its head cache, torn-tail repair and many writers on one file."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lkm.audit import (
    AuditLog,
    AuditWriteError,
    chain_files,
    verify,
    verify_chain_files,
)
from lkm.audit import appender as audit_appender
from lkm.audit import files as audit_files
from tests.audit.chain import all_records, event, lines_of


def test_head_is_cached_while_the_file_is_as_this_process_left_it(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    for i in range(10):
        log.record_sync(event(i))
    assert log.head_reads == 1


def test_two_writers_alternating_reread_the_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    a, b = AuditLog(path), AuditLog(path)
    for i in range(10):
        (a if i % 2 == 0 else b).record_sync(event(i))
    res = verify([path])
    assert res.ok, res
    assert res.records == 10
    assert a.head_reads == 5 and b.head_reads == 5


def test_head_comes_from_newest_rotated_file_when_current_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    AuditLog(path).record_sync(event(1))
    AuditLog(path).record_sync(event(2))
    path.rename(tmp_path / "audit.log.20240101T000000000000Z")
    AuditLog(path).record_sync(event(3))
    rec = json.loads(lines_of(path)[0])
    assert rec["seq"] == 3
    res = verify_chain_files(path)
    assert res.ok and res.records == 3 and res.files == 2


def test_empty_current_file_chains_to_rotated(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    AuditLog(path).record_sync(event(1))
    path.rename(tmp_path / "audit.log.20240101T000000000000Z")
    log = AuditLog(path)
    assert log.check_writable()  # creates an empty current file
    assert path.exists() and path.stat().st_size == 0
    log.record_sync(event(2))
    assert verify_chain_files(path).ok


def test_torn_tail_is_repaired_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    for i in range(3):
        log.record_sync(event(i))
    with path.open("ab") as f:
        f.write(b'{"action":"decr')  # a writer died mid-write
    assert verify([path]).reason == "truncated last line"
    AuditLog(path).record_sync(event(3))
    res = verify([path])
    assert res.ok and res.records == 4
    lines = lines_of(path)
    assert len(lines) == 4 and all(json.loads(line)["seq"] for line in lines)
    assert path.read_bytes().endswith(b"}\n")


def test_unreadable_head_refuses_to_guess(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_bytes(b"not json\n")
    log = AuditLog(path)
    with pytest.raises(AuditWriteError, match="unreadable"):
        log.record_sync(event(1))
    assert not log.healthy and log.write_failures == 1
    assert path.read_bytes() == b"not json\n"


REPO = Path(__file__).resolve().parents[1]


WRITER = """
import asyncio, sys, time
from pathlib import Path
from lkm.audit import AuditLog

path, who, mode, start, duration, max_bytes = (
    Path(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6]))
log = AuditLog(path, max_bytes=max_bytes)
while time.time() < start:
    time.sleep(0.001)
n = 0
if mode == "sync":
    while time.time() < start + duration:
        log.record_sync({"client": who, "request_id": f"{who}-{n}", "action": "decrypt"})
        n += 1
else:
    async def main() -> int:
        n = 0
        async with log:
            while time.time() < start + duration:
                await asyncio.gather(*(log.record({"client": who, "request_id": f"{who}-{n + j}"})
                                       for j in range(5)))
                n += 5
        return n
    n = asyncio.run(main())
print(n)
"""


@pytest.mark.slow
@pytest.mark.parametrize("max_bytes", [0, 4096], ids=["one-file", "rotating"])
def test_processes_appending_concurrently_form_one_chain(tmp_path: Path, max_bytes: int) -> None:
    path = tmp_path / "audit.log"
    start = time.time() + 1.5  # all processes have imported lkm by then
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writers = [("p1", "sync"), ("p2", "sync"), ("p3", "async")]
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), who, mode, str(start), "0.7",
                          str(max_bytes)],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for who, mode in writers
    ]
    counts: dict[str, int] = {}
    for (who, _), proc in zip(writers, procs, strict=True):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        counts[who] = int(out)
    total = sum(counts.values())
    assert all(n > 0 for n in counts.values()), counts

    files = chain_files(path)
    for f in files:
        data = f.read_bytes()
        assert data.endswith(b"\n")
        for line in data.splitlines():
            json.loads(line)  # no torn or interleaved lines
    if max_bytes:
        assert len(files) > 1
    res = verify_chain_files(path)
    assert res.ok, res
    assert res.records == total and res.last_seq == total
    records = all_records(path)
    assert [r["seq"] for r in records] == list(range(1, total + 1))
    for who, n in counts.items():
        assert sorted(r["request_id"] for r in records if r["client"] == who) == sorted(
            f"{who}-{i}" for i in range(n))
    # the writers really overlapped, so the lock was exercised
    switches = sum(1 for a, b in itertools.pairwise(records) if a["client"] != b["client"])
    assert switches > 2


def test_failed_write_leaves_no_torn_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.record_sync(event(1))
    real_write = os.write

    def half_then_enospc(fd: int, data: Any) -> int:
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_enospc)
    with pytest.raises(AuditWriteError, match="No space"):
        log.record_sync(event(2))
    monkeypatch.undo()
    assert verify([path]).ok  # the half line was taken back
    log.record_sync(event(3))
    res = verify([path])
    assert res.ok and res.records == 2


def test_on_failure_hook_errors_do_not_mask_the_write_error(tmp_path: Path) -> None:
    blocker = tmp_path / "f"
    blocker.write_text("x")

    def boom() -> None:
        raise RuntimeError("metrics down")

    log = AuditLog(blocker / "audit.log", on_failure=boom)
    with pytest.raises(AuditWriteError):
        log.record_sync(event(1))
    assert log.write_failures == 1


def test_new_and_rotated_files_are_made_durable_in_their_directory(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real = audit_appender.fsync_dir

    def spy(directory: Path) -> None:
        calls.append(directory)
        real(directory)

    monkeypatch.setattr(audit_appender, "fsync_dir", spy)
    monkeypatch.setattr(audit_files, "fsync_dir", spy)
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=2000)
    log.record_sync(event(1))
    assert calls == [tmp_path]  # the new file's directory entry
    log.record_sync(event(2))
    assert calls == [tmp_path]  # an append to an existing file needs no directory fsync
    while log.rotations == 0:
        log.record_sync(event(3))
    assert len(calls) >= 3  # the rename, then the new file
