"""lkm.audit.verify: every kind of tampering is named at the first bad record."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from lkm.audit import (
    AuditLog,
    VerifyResult,
    rotated_files,
    verify,
    verify_chain_files,
)
from tests.audit.chain import canonical, event, lines_of, rehash, sha


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
    assert verify_chain_files(tmp_path / "none.log") == VerifyResult(ok=True, records=0, files=0)
    res = verify([tmp_path / "missing.log"])
    assert not res.ok and res.reason is not None and res.reason.startswith("unreadable")


def test_an_intent_without_an_outcome_is_a_finding_not_a_broken_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.record_sync({"action": "create_key", "key_id": "k1", "outcome": "intent", "intent": "a"})
    log.record_sync({"action": "create_key", "key_id": "k1", "outcome": "ok", "intent": "a"})
    log.record_sync({"action": "hawk_create", "key_id": None, "outcome": "intent", "intent": "b",
                     "hawk_id": "platform"})
    log.record_sync({"action": "restore_key", "key_id": "k2", "outcome": "intent", "intent": "c"})
    log.record_sync({"action": "restore_key", "key_id": "k2", "outcome": "error", "intent": "c"})
    result = verify_chain_files(path)
    assert result.ok and result.records == 5
    [open_intent] = result.unfinished
    assert (open_intent.seq, open_intent.action, open_intent.subject) == (3, "hawk_create", "platform")
    assert "hawk_create" in open_intent.line() and "platform" in open_intent.line()
