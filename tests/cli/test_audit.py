"""`lkm audit verify` through the real CLI: only an existing, non-empty, whole trail from its head verifies."""

from __future__ import annotations

from pathlib import Path

import pytest

from lkm.audit import AuditLog, rotated_files
from tests.audit.chain import event
from tests.lkmcli import lkm_here


def _trail(tmp_path: Path, records: int = 40) -> Path:
    path = tmp_path / "audit.log"
    log = AuditLog(path, max_bytes=1500)
    for i in range(records):
        log.record_sync(event(i))
    return path


def test_a_whole_trail_verifies_and_says_where_it_starts(tmp_path: Path) -> None:
    path = _trail(tmp_path)
    result = lkm_here("audit", "verify", str(path))
    assert result.returncode == 0
    assert "OK, 40 records" in result.stdout and "chain intact from seq 1 (hash " in result.stdout
    assert "to seq 40 (head " in result.stdout


def test_a_missing_trail_does_not_verify(tmp_path: Path) -> None:
    result = lkm_here("audit", "verify", str(tmp_path / "nonexist.log"), check=False)
    assert result.returncode == 1 and "OK" not in result.stdout
    assert "nonexist.log: no audit trail here" in result.stderr and "audit.path" in result.stderr


def test_an_empty_trail_does_not_verify(tmp_path: Path) -> None:
    (tmp_path / "audit.log").write_bytes(b"")
    result = lkm_here("audit", "verify", str(tmp_path / "audit.log"), check=False)
    assert result.returncode == 1 and "empty: 0 records in 1 file(s)" in result.stderr


def test_a_directory_does_not_verify(tmp_path: Path) -> None:
    _trail(tmp_path)
    result = lkm_here("audit", "verify", str(tmp_path), check=False)
    assert result.returncode == 1 and "is a directory" in result.stderr and "audit.log" in result.stderr


@pytest.mark.slow
def test_a_trail_that_lost_its_first_file_does_not_verify(tmp_path: Path) -> None:
    path = _trail(tmp_path)
    rotated_files(path)[0].unlink()
    result = lkm_here("audit", "verify", str(path), check=False)
    assert result.returncode == 1
    assert "NOT VERIFIED: the chain starts at seq " in result.stdout and "not at the genesis record" in result.stdout
    accepted = lkm_here("audit", "verify", "--accept-pruned", str(path))
    assert "older files pruned" in accepted.stdout
