"""lkm.audit.record: the record format, forbidden and reserved fields, the actor of the CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from lkm.audit import (
    FORBIDDEN_FIELDS,
    GENESIS_PREV,
    AuditAction,
    AuditLog,
    AuditOutcome,
    local_actor,
    record,
    verify,
    verify_chain_files,
)
from lkm.audit.record import Head, prepare, seal
from tests.audit.chain import canonical, event, lines_of, sha


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
    assert {"key", "wrapped_key", "plaintext", "ciphertext", "body", "private_key"} <= FORBIDDEN_FIELDS
    log = AuditLog(tmp_path / "audit.log")
    log.record_sync({"key_id": "kek-1", "actor": {"hawk_id": "h1"}})
    assert verify([tmp_path / "audit.log"]).records == 1


def test_names_checked_once_are_remembered_within_bounds_and_never_unforbid() -> None:
    for n in range(record._ALLOWED_NAMES_MAX + 100):
        prepare({f"field_{n}": n})
    assert len(record._ALLOWED_NAMES) <= record._ALLOWED_NAMES_MAX
    assert prepare({"route": "x", "nested": {"route": "y"}})["nested"] == {"route": "y"}
    for name in ("key", "Key", "PLAINTEXT"):
        with pytest.raises(ValueError, match="must not carry"):
            prepare({"action": "x", "details": {name: "v"}})
    assert name.lower() not in record._ALLOWED_NAMES


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


# A trail written by lkm before the audit module became a package; its bytes must keep verifying and new
# records must be sealed to the very same bytes, or every trail in the field breaks.
TRAIL_V1 = Path(__file__).parent / "vectors" / "trail-v1.log"
TRAIL_V1_HEAD = "d14b8c143cf0e597599caa596d11865c79d6a92bc3c4fb82d7d359f393b0f9e8"


def _trail_v1_events() -> list[dict[str, Any]]:
    keep = ("seq", "prev", "hash")
    return [{k: v for k, v in json.loads(line).items() if k not in keep} for line in lines_of(TRAIL_V1)]


def test_a_trail_written_before_still_verifies_and_continues(tmp_path: Path) -> None:
    res = verify([TRAIL_V1])
    assert res.ok and res.records == 4 and res.head == TRAIL_V1_HEAD
    path = tmp_path / "audit.log"
    shutil.copy(TRAIL_V1, path)
    AuditLog(path).record_sync({"action": AuditAction.UNWRAP, "key_id": None, "outcome": AuditOutcome.OK})
    res = verify_chain_files(path)
    assert res.ok and res.records == 5
    assert json.loads(lines_of(path)[-1])["prev"] == TRAIL_V1_HEAD


def test_the_same_events_seal_to_the_same_bytes(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    for ev in _trail_v1_events():
        # The enums stand in for the strings they replace without changing a byte.
        ev["action"] = AuditAction(ev["action"])
        ev["outcome"] = AuditOutcome(ev["outcome"])
        log.record_sync(ev)
    assert path.read_bytes() == TRAIL_V1.read_bytes()


def test_audit_action_values_are_the_strings_the_trail_has_always_held() -> None:
    assert {a.value for a in AuditAction} == {
        "unwrap", "authenticate", "authorize", "create_key", "import_key", "rotate_key", "register_key",
        "activate_key", "disable_key", "enable_key", "schedule_destruction", "cancel_destruction", "destroy_key",
        "destroy_key_dry_run", "backup_create", "backup_restore", "restore_key", "migrate_key", "hawk_create",
        "hawk_revoke", "freeze_caller", "unfreeze_caller"}
    assert {o.value for o in AuditOutcome} == {"ok", "error", "denied", "intent"}
    assert json.dumps({"action": AuditAction.ROTATE_KEY}) == '{"action": "rotate_key"}'


def test_prepare_copies_an_event_as_its_json_would_read_back() -> None:
    """The one-pass copy of plain events and the JSON round trip of the others give the same snapshot."""
    from lkm.audit.record import prepare
    from lkm.canonical import canonical_json

    actor = {"kind": "hawk", "name": "hawk:platform", "hawk_id": "p-1"}
    event = {"action": "unwrap", "outcome": AuditOutcome.OK, "actor": actor, "latency_ms": 0.5, "n": 3,
             "ok": True, "none": None, "time": "2020-01-01T00:00:00.000Z"}
    body = prepare(event)
    assert body == json.loads(canonical_json(event))
    assert type(body["outcome"]) is str
    actor["name"] = "changed"
    assert body["actor"]["name"] == "hawk:platform"  # a snapshot: the caller's later changes do not reach it
    assert prepare({**event, "list": (1, {"a": 2})})["list"] == [1, {"a": 2}]
    for bad in ({"x": float("inf")}, {"actor": {"Secret": "s"}}, {"prev": "0"}):
        with pytest.raises(ValueError):
            prepare(bad)


@pytest.mark.parametrize("fields", [
    {},  # nothing sorts before "hash"
    {"zone": "z"},
    {"a": "é\"\\\n", "hasg": 1, "hasi": None, "h": True, "key_id": "k", "nested": {"hash": "x", "a": 2.5}},
])
def test_a_sealed_line_is_the_record_serialized_with_its_hash(fields: dict[str, Any]) -> None:
    head = Head(7, "cd" * 32)
    line, after = seal(prepare({"time": "2026-01-01T00:00:00.000Z", **fields}), head)
    record = json.loads(line)
    claimed = record.pop("hash")
    assert claimed == sha(canonical(record)) and record["seq"] == 8 and record["prev"] == "cd" * 32
    assert line == canonical({**record, "hash": claimed}) + b"\n"
    assert after == Head(8, sha(line[:-1]))
