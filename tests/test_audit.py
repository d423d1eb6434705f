from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from lkm import audit
from lkm.audit import (
    GENESIS_PREV,
    AuditLog,
    AuditWriteError,
    chain_files,
    local_actor,
    rotated_files,
    verify,
    verify_chain_files,
)
from lkm.config import AuditSettings

REPO = Path(__file__).resolve().parents[1]


def event(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "request_id": f"req-{i}",
        "actor": {"kind": "mtls", "subject": "CN=platform", "fingerprint": "ab" * 32},
        "action": "decrypt",
        "key_id": f"kek-{i % 3}",
        "outcome": "allow",
        "latency_ms": 1.5,
        **extra,
    }


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def all_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for f in chain_files(path) for line in lines_of(f)]


def rehash(rec: dict[str, Any]) -> dict[str, Any]:
    rec = {k: v for k, v in rec.items() if k != "hash"}
    rec["hash"] = sha(canonical(rec))
    return rec


# -- record format ---------------------------------------------------------------------------------


def test_record_format_and_chain_links(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.record_sync(event(1))
    log.record_sync(event(2, time="2024-01-02T03:04:05.678Z"))
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    first, second = raw.splitlines()
    r1, r2 = json.loads(first), json.loads(second)
    # compact, sorted keys, the exact bytes hashed by the next record
    assert first == canonical(r1)
    assert r1["seq"] == 1 and r2["seq"] == 2
    assert r1["prev"] == GENESIS_PREV
    assert r2["prev"] == sha(first)
    assert r1["hash"] == sha(canonical({k: v for k, v in r1.items() if k != "hash"}))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r1["time"])
    assert r2["time"] == "2024-01-02T03:04:05.678Z"  # a caller's time is kept
    assert r1["actor"]["fingerprint"] == "ab" * 32
    res = verify([path])
    assert res.ok and res.records == 2 and res.files == 1 and not res.anchored
    assert res.last_seq == 2 and res.head == sha(second)


def test_event_is_snapshotted_at_record_time(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    ev = event(1)
    log = AuditLog(path)
    log.record_sync(ev)
    ev["outcome"] = "deny"
    assert json.loads(lines_of(path)[0])["outcome"] == "allow"
    assert "seq" not in ev and "hash" not in ev


@pytest.mark.parametrize(
    "bad",
    [
        {"action": "wrap", "key": "MIIE..."},
        {"action": "wrap", "details": {"wrapped_key": "AAAA"}},
        {"action": "wrap", "details": [{"ok": 1}, {"Plaintext": "x"}]},
        {"action": "wrap", "ciphertext": "x"},
        {"action": "wrap", "body": "{...}"},
        {"action": "wrap", "actor": {"kind": "cli", "private_key": "-----BEGIN"}},
    ],
)
async def test_forbidden_fields_are_refused_at_any_depth(tmp_path: Path, bad: dict[str, Any]) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    with pytest.raises(ValueError, match="must not carry"):
        log.record_sync(bad)
    async with log:
        with pytest.raises(ValueError, match="must not carry"):
            await log.record(bad)
    assert not path.exists() or path.read_bytes() == b""
    assert log.healthy and log.write_failures == 0  # the caller's mistake, not a write failure


def test_forbidden_field_list_and_key_id_allowed(tmp_path: Path) -> None:
    assert {"key", "wrapped_key", "plaintext", "ciphertext", "body", "private_key"} <= audit.FORBIDDEN_FIELDS
    log = AuditLog(tmp_path / "audit.log")
    log.record_sync({"key_id": "kek-1", "actor": {"hawk_id": "h1"}})
    assert verify([tmp_path / "audit.log"]).records == 1


@pytest.mark.parametrize("field", ["seq", "prev", "hash"])
def test_reserved_fields_are_refused(tmp_path: Path, field: str) -> None:
    with pytest.raises(ValueError, match="set by the audit chain"):
        AuditLog(tmp_path / "audit.log").record_sync({"action": "x", field: 1})


def test_local_actor() -> None:
    actor = local_actor()
    assert actor["kind"] == "cli"
    assert actor["pid"] == os.getpid()
    assert isinstance(actor["user"], str) and actor["user"]
    assert isinstance(actor["host"], str) and actor["host"]


def test_from_settings(tmp_path: Path) -> None:
    settings = AuditSettings(path=tmp_path / "a.log", fail_closed=False, max_bytes=1234, keep_files=3)
    log = AuditLog.from_settings(settings)
    assert (log.path, log.fail_closed, log.max_bytes, log.keep_files) == (tmp_path / "a.log", False, 1234, 3)


# -- group commit ----------------------------------------------------------------------------------


async def test_concurrent_records_are_group_committed(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    async with AuditLog(path) as log:
        await asyncio.gather(*(log.record(event(i)) for i in range(200)))
        assert log.records_written == 200
        assert log.fsync_count < 200
        assert log.batch_count == log.fsync_count  # one fsync per batch, no rotation here
    lines = lines_of(path)
    assert len(lines) == 200
    assert sorted(json.loads(line)["request_id"] for line in lines) == sorted(f"req-{i}" for i in range(200))
    res = verify([path])
    assert res.ok and res.records == 200 and res.last_seq == 200


async def test_record_returns_only_after_its_line_is_fsynced_off_the_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit.log"
    real_fsync = os.fsync
    synced: list[int] = []  # file sizes at each fsync of the audit file
    threads: set[str] = set()
    loop_thread = threading.current_thread().name

    def spy(fd: int) -> None:
        real_fsync(fd)
        if os.path.samestat(os.fstat(fd), path.stat()):
            synced.append(os.fstat(fd).st_size)
            threads.add(threading.current_thread().name)

    monkeypatch.setattr(os, "fsync", spy)

    async def one(i: int) -> None:
        await log.record(event(i))
        data = path.read_bytes()
        end = data.index(f'"req-{i}"'.encode())
        end = data.index(b"\n", end) + 1
        assert synced and max(synced) >= end, f"req-{i} returned before its line was fsynced"

    async with AuditLog(path) as log:
        await asyncio.gather(*(one(i) for i in range(50)))
        for i in range(50, 60):
            await one(i)
    assert synced
    assert loop_thread not in threads
    assert verify([path]).records == 60


async def test_close_flushes_pending_and_refuses_later_records(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    await log.start()
    tasks = [asyncio.create_task(log.record(event(i))) for i in range(30)]
    await asyncio.sleep(0)  # the tasks queue their records
    await log.close()
    assert all(t.done() and t.exception() is None for t in tasks)
    assert len(lines_of(path)) == 30
    with pytest.raises(AuditWriteError, match="closed"):
        await log.record(event(99))
    assert verify([path]).ok


async def test_record_starts_the_writer_lazily(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    try:
        await log.record(event(1))
    finally:
        await log.close()
    assert verify([tmp_path / "audit.log"]).records == 1


# -- head cache and cross-writer safety ------------------------------------------------------------


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


async def test_server_writer_keeps_its_file_open_yet_follows_other_writers(tmp_path: Path) -> None:
    """The server's writer keeps the audit file open between appends; a CLI append or a rotation by another
    writer in between must still be chained after, never written to the old, renamed file."""
    path = tmp_path / "audit.log"
    server, cli = AuditLog(path, max_bytes=1500), AuditLog(path, max_bytes=1500)
    async with server:
        for i in range(12):
            await server.record(event(i))
            cli.record_sync(event(100 + i))  # fills the file, so some of these rotate it under the server
        head_reads = server.head_reads
        await server.record(event(999))
        await server.record(event(1000))
        assert server.head_reads == head_reads + 1  # re-read once after the CLI's append, then cached
    assert cli.rotations > 0 and server.rotations > 0
    res = audit.verify_chain_files(path)
    assert res.ok, res
    assert res.records == 26 and res.files > 2


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


# -- failures --------------------------------------------------------------------------------------


async def test_write_failure_fails_every_waiter_and_marks_unhealthy(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    calls: list[int] = []
    log = AuditLog(blocker / "audit.log", on_failure=lambda: calls.append(1))
    assert not log.check_writable()
    async with log:
        results = await asyncio.gather(*(log.record(event(i)) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, AuditWriteError) for r in results), results
    assert not log.healthy
    assert log.write_failures >= 1
    assert len(calls) == log.write_failures
    assert log.last_error is not None and "NotADirectoryError" in log.last_error
    with pytest.raises(AuditWriteError):
        log.record_sync(event(9))
    assert len(calls) == log.write_failures


async def test_recovery_after_the_directory_comes_back(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    directory.mkdir()
    path = directory / "audit.log"
    failures: list[int] = []
    async with AuditLog(path, on_failure=lambda: failures.append(1)) as log:
        await log.record(event(1))
        assert log.healthy and log.check_writable()
        shutil.rmtree(directory)
        assert not log.check_writable()
        with pytest.raises(AuditWriteError):
            await log.record(event(2))
        assert not log.healthy and log.write_failures == 1 and failures == [1]
        error = log.last_error
        directory.mkdir()
        await log.record(event(3))
        assert log.healthy
        assert log.last_error == error  # kept for diagnosis
    res = verify([path])
    assert res.ok and res.records == 1


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


# -- rotation --------------------------------------------------------------------------------------


def test_rotation_keeps_the_chain_across_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=2000)
    for i in range(60):
        log.record_sync(event(i))
    rotated = rotated_files(path)
    assert len(rotated) >= 3
    assert log.rotations == len(rotated)
    for f in [*rotated, path]:
        assert 0 < f.stat().st_size <= 2000
        assert re.fullmatch(r"audit\.log(\.\d{8}T\d{12}Z)?", f.name)
    assert chain_files(path) == [*sorted(rotated), path]
    res = verify_chain_files(path)
    assert res.ok and res.records == 60 and res.files == len(rotated) + 1 and not res.anchored
    # the current file's first record continues the rotated file's chain
    first = json.loads(lines_of(path)[0])
    assert first["prev"] == sha(lines_of(rotated[-1])[-1])
    assert first["seq"] == json.loads(lines_of(rotated[-1])[-1])["seq"] + 1


async def test_rotation_within_a_batch(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    async with AuditLog(path, max_bytes=1500) as log:
        await asyncio.gather(*(log.record(event(i)) for i in range(80)))
    assert len(rotated_files(path)) >= 3
    for f in chain_files(path):
        assert f.stat().st_size <= 1500
    res = verify_chain_files(path)
    assert res.ok and res.records == 80


def test_keep_files_prunes_oldest_and_verify_reports_anchor(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=1500, keep_files=2)
    for i in range(80):
        log.record_sync(event(i))
    assert log.rotations > 2
    assert len(rotated_files(path)) == 2
    res = verify_chain_files(path)
    assert res.ok, res
    assert res.anchored and res.note and "anchor" in res.note
    assert 0 < res.records < 80 and res.last_seq == 80


def test_rotated_names_stay_in_order_when_the_clock_repeats(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    frozen = datetime(2030, 1, 1, tzinfo=UTC)

    class FrozenDatetime(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> FrozenDatetime:
            return cls.fromtimestamp(frozen.timestamp(), tz)

    monkeypatch.setattr(audit, "datetime", FrozenDatetime)
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=600)
    for i in range(20):
        log.record_sync(event(i))
    rotated = rotated_files(path)
    assert len(rotated) >= 3
    assert len({f.name for f in rotated}) == len(rotated)
    assert verify_chain_files(path).ok


def test_deleted_rotated_file_in_the_middle_breaks_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=1500)
    for i in range(80):
        log.record_sync(event(i))
    rotated = rotated_files(path)
    assert len(rotated) >= 3
    rotated[1].unlink()
    res = verify_chain_files(path)
    assert not res.ok
    assert res.first_bad_file == str(rotated[2])
    assert res.first_bad_line == 1
    assert res.reason is not None and res.reason.startswith("prev does not match")


# -- verification of tampering ---------------------------------------------------------------------


def _edit(lines: list[bytes]) -> list[bytes]:
    rec = json.loads(lines[4])
    rec["outcome"] = "deny"
    lines[4] = canonical(rec)
    return lines


def _edit_and_rehash(lines: list[bytes]) -> list[bytes]:
    lines[4] = canonical(rehash({**json.loads(lines[4]), "key_id": "other"}))
    return lines


def _delete_middle(lines: list[bytes]) -> list[bytes]:
    del lines[4]
    return lines


def _delete_last_but_one(lines: list[bytes]) -> list[bytes]:
    del lines[8]
    return lines


def _swap(lines: list[bytes]) -> list[bytes]:
    lines[3], lines[4] = lines[4], lines[3]
    return lines


def _insert_forged(lines: list[bytes]) -> list[bytes]:
    # A well-formed record that links to line 4; the original line 5 then no longer links.
    forged = rehash({**json.loads(lines[4]), "request_id": "forged", "prev": sha(lines[3])})
    lines.insert(4, canonical(forged))
    return lines


def _insert_copy(lines: list[bytes]) -> list[bytes]:
    lines.insert(6, lines[2])
    return lines


def _seq_gap(lines: list[bytes]) -> list[bytes]:
    lines[4] = canonical(rehash({**json.loads(lines[4]), "seq": 9}))
    return lines


def _not_json(lines: list[bytes]) -> list[bytes]:
    lines[4] = b'{"seq": 5, oops'
    return lines


def _reformatted(lines: list[bytes]) -> list[bytes]:
    lines[4] = json.dumps(json.loads(lines[4]), sort_keys=True).encode()  # same content, spaces added
    return lines


def _genesis_edited(lines: list[bytes]) -> list[bytes]:
    lines[0] = canonical(rehash({**json.loads(lines[0]), "seq": 0}))
    return lines


TAMPERING: list[tuple[str, Callable[[list[bytes]], list[bytes]], int, int | None, str]] = [
    ("edited field", _edit, 5, 5, "hash mismatch (record edited)"),
    ("edited field, hash recomputed", _edit_and_rehash, 6, 6, "prev does not match"),
    ("deleted middle record", _delete_middle, 5, 6, "prev does not match"),
    ("deleted last-but-one record", _delete_last_but_one, 9, 10, "prev does not match"),
    ("swapped records", _swap, 4, 5, "prev does not match"),
    ("inserted forged record", _insert_forged, 6, 5, "prev does not match"),
    ("inserted copied record", _insert_copy, 7, 3, "prev does not match"),
    ("sequence gap", _seq_gap, 5, 9, "sequence gap"),
    ("garbage line", _not_json, 5, None, "not valid JSON"),
    ("reformatted record", _reformatted, 5, 5, "record not in canonical form"),
    ("genesis seq edited", _genesis_edited, 1, 0, "sequence gap"),
]


@pytest.fixture
def chain10(tmp_path: Path) -> list[bytes]:
    path = tmp_path / "base.log"
    log = AuditLog(path)
    for i in range(10):
        log.record_sync(event(i))
    assert verify([path]).ok
    return lines_of(path)


@pytest.mark.parametrize(("mutate", "line", "seq", "reason"), [t[1:] for t in TAMPERING],
                         ids=[t[0] for t in TAMPERING])
def test_verify_names_the_first_tampered_record(tmp_path: Path, chain10: list[bytes],
                                                mutate: Callable[[list[bytes]], list[bytes]], line: int,
                                                seq: int | None, reason: str) -> None:
    path = tmp_path / "tampered.log"
    path.write_bytes(b"".join(x + b"\n" for x in mutate(list(chain10))))
    res = verify([path])
    assert not res.ok
    assert res.first_bad_file == str(path)
    assert res.first_bad_line == line
    assert res.first_bad_seq == seq
    assert res.reason is not None and res.reason.startswith(reason), res.reason
    assert res.records == line - 1


def test_verify_truncated_last_line(tmp_path: Path, chain10: list[bytes]) -> None:
    path = tmp_path / "tampered.log"
    path.write_bytes(b"".join(x + b"\n" for x in chain10)[:-20])
    res = verify([path])
    assert not res.ok and res.reason == "truncated last line" and res.first_bad_line == 10


def test_verify_edited_record_in_a_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=1500)
    for i in range(40):
        log.record_sync(event(i))
    target = rotated_files(path)[1]
    lines = lines_of(target)
    rec = json.loads(lines[1])
    rec["key_id"] = "kek-evil"
    lines[1] = canonical(rec)
    target.write_bytes(b"".join(x + b"\n" for x in lines))
    res = verify_chain_files(path)
    assert not res.ok
    assert (res.first_bad_file, res.first_bad_line) == (str(target), 2)
    assert res.reason == "hash mismatch (record edited)"


def test_verify_empty_set_and_missing_file(tmp_path: Path) -> None:
    assert verify_chain_files(tmp_path / "none.log") == audit.VerifyResult(ok=True, records=0, files=0)
    res = verify([tmp_path / "missing.log"])
    assert not res.ok and res.reason is not None and res.reason.startswith("unreadable")


def test_new_and_rotated_files_are_made_durable_in_their_directory(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    real = audit.fsync_dir

    def spy(directory: Path) -> None:
        calls.append(directory)
        real(directory)

    monkeypatch.setattr(audit, "fsync_dir", spy)
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=2000)
    log.record_sync(event(1))
    assert calls == [tmp_path]  # the new file's directory entry
    log.record_sync(event(2))
    assert calls == [tmp_path]  # an append to an existing file needs no directory fsync
    while log.rotations == 0:
        log.record_sync(event(3))
    assert len(calls) >= 3  # the rename, then the new file
