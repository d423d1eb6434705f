"""lkm.audit.files: rotation keeps the chain, prunes, and names files in chain order."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime
from pathlib import Path

from lkm.audit import (
    AuditLog,
    chain_files,
    rotated_files,
    verify_chain_files,
)
from lkm.audit.files import rotate
from tests.audit.chain import event, lines_of, sha


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


def test_rotated_names_stay_in_order_when_the_clock_repeats(tmp_path: Path) -> None:
    frozen = datetime(2030, 1, 1, tzinfo=UTC)
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=600, clock=lambda: frozen)
    for i in range(20):
        log.record_sync(event(i))
    rotated = rotated_files(path)
    assert len(rotated) >= 3
    assert len({f.name for f in rotated}) == len(rotated)
    assert rotated[0].name == "audit.log.20300101T000000000000Z"  # the injected clock named it
    assert verify_chain_files(path).ok


def test_rotated_names_stay_in_order_when_the_clock_steps_back(tmp_path: Path) -> None:
    times = iter([datetime(2030, 1, 1, 0, 0, 5, tzinfo=UTC), datetime(2030, 1, 1, tzinfo=UTC)])
    path = tmp_path / "audit.log"
    path.write_bytes(b"x\n")
    first = rotate(path, keep_files=0, clock=lambda: next(times))
    path.write_bytes(b"y\n")
    second = rotate(path, keep_files=0, clock=lambda: next(times))
    assert first.name < second.name
    assert rotated_files(path) == [first, second]
    assert [f.read_bytes() for f in rotated_files(path)] == [b"x\n", b"y\n"]


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
