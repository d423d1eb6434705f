"""Verification: does a set of files form one unbroken chain, and if not, which record is the first bad one.

Editing a record breaks its own `hash`; removing, inserting or moving one breaks the next record's `prev`;
`seq` makes gaps obvious to a human reader. A chain cannot stop someone who rewrites every record from the
tampered one to the end, so operators should copy the head (`VerifyResult.head`) somewhere else from time to
time to pin it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from lkm.audit.files import chain_files
from lkm.audit.record import FIRST_SEQ, GENESIS_PREV, INTENT_FIELD, AuditOutcome, sha256_hex
from lkm.canonical import canonical_json

__all__ = ["UnfinishedIntent", "VerifyResult", "verify", "verify_chain_files"]

_EDITED: Final = "hash mismatch (record edited)"
_BROKEN_LINK: Final = "prev does not match the previous record (record deleted, inserted or reordered)"
_GAP: Final = "sequence gap"


@dataclass(frozen=True)
class UnfinishedIntent:
    """An intent record with no record of its outcome after it: the change may or may not have happened (the
    process stopped in between). Not a fault of the chain; a finding for the operator to check."""

    seq: int
    time: str
    action: str
    key_id: str | None
    subject: str | None  # what else the intent names (a Hawk credential id, a caller)

    def line(self) -> str:
        about = " ".join(f"{k} {v}" for k, v in (("key", self.key_id), ("subject", self.subject)) if v)
        return f"seq {self.seq} {self.time} {self.action} {about}".rstrip()


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int  # records found intact (before the first bad one, when not ok)
    files: int  # files opened
    first_bad_file: str | None = None
    first_bad_line: int | None = None  # 1-based, within first_bad_file
    first_bad_seq: int | None = None
    reason: str | None = None
    # True when the oldest record is not the genesis record (older files pruned): its prev was taken on trust.
    anchored: bool = False
    note: str | None = None
    last_seq: int | None = None
    head: str | None = None  # SHA-256 of the last intact line: what the next record's prev must be
    first_seq: int | None = None  # where the chain starts: the oldest record's seq and hash
    first_hash: str | None = None
    unfinished: tuple[UnfinishedIntent, ...] = ()  # intents without an outcome, oldest first


@dataclass
class _Walk:
    """Where verification stands: the last intact record so far."""

    prev_digest: str | None = None
    prev_seq: int = FIRST_SEQ - 1
    records: int = 0
    anchored: bool = False
    note: str | None = None
    first_seq: int | None = None
    first_hash: str | None = None
    intents: dict[str, UnfinishedIntent] = field(default_factory=dict)  # open intents by id, in order

    def pair(self, rec: dict[str, Any]) -> None:
        """Opens an intent, or closes the one an outcome names (an outcome whose intent was pruned: nothing)."""
        intent = rec.get(INTENT_FIELD)
        if not isinstance(intent, str):
            return
        if rec.get("outcome") == AuditOutcome.INTENT:
            subject = next((str(rec[k]) for k in ("hawk_id", "caller") if isinstance(rec.get(k), str)), None)
            key_id = rec.get("key_id")
            self.intents[intent] = UnfinishedIntent(rec["seq"], str(rec.get("time", "")), str(rec.get("action")),
                                                    key_id if isinstance(key_id, str) else None, subject)
        else:
            self.intents.pop(intent, None)

    def result(self, *, files: int, ok: bool = True, bad_file: str | None = None, bad_line: int | None = None,
               bad_seq: Any = None, reason: str | None = None) -> VerifyResult:
        return VerifyResult(
            ok=ok, records=self.records, files=files, first_bad_file=bad_file, first_bad_line=bad_line,
            first_bad_seq=bad_seq if isinstance(bad_seq, int) and not isinstance(bad_seq, bool) else None,
            reason=reason, anchored=self.anchored, note=self.note,
            last_seq=self.prev_seq if self.prev_digest is not None else None, head=self.prev_digest,
            first_seq=self.first_seq, first_hash=self.first_hash,
            unfinished=tuple(self.intents.values()))


def _check_line(raw: bytes, path: Path, walk: _Walk) -> tuple[str, Any] | None:
    """(reason, seq) for a bad record; None after advancing `walk` past a good one."""
    if not raw.endswith(b"\n"):
        return "truncated last line", None
    line = raw[:-1]
    try:
        rec = json.loads(line)
    except ValueError:
        return "not valid JSON", None
    if not isinstance(rec, dict):
        return "not a JSON object", None
    seq, prev, digest = rec.get("seq"), rec.get("prev"), rec.get("hash")
    if (not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(prev, str)
            or not isinstance(digest, str)):
        return "malformed record (seq, prev or hash missing)", seq
    try:
        if sha256_hex(canonical_json({k: v for k, v in rec.items() if k != "hash"})) != digest:
            return _EDITED, seq
        canonical = canonical_json(rec) == line
    except ValueError:
        canonical = False
    if not canonical:
        # Same content, other bytes: the next record's prev no longer matches this line.
        return "record not in canonical form (record edited)", seq
    if walk.prev_digest is None:
        if prev != GENESIS_PREV:
            walk.anchored = True
            walk.note = (f"the oldest record (seq {seq} in {path}) is not the genesis record: older files "
                         f"are missing (pruned by keep_files?), so its prev is taken as the anchor and "
                         f"nothing before it is vouched for")
        elif seq != FIRST_SEQ:
            return f"{_GAP} (the genesis record must have seq {FIRST_SEQ})", seq
    else:
        if prev != walk.prev_digest:
            return _BROKEN_LINK, seq
        if seq != walk.prev_seq + 1:
            return f"{_GAP} (expected seq {walk.prev_seq + 1})", seq
    if walk.first_seq is None:
        walk.first_seq, walk.first_hash = seq, digest
    walk.prev_digest = sha256_hex(line)
    walk.prev_seq = seq
    walk.records += 1
    walk.pair(rec)
    return None


def verify(paths: Sequence[Path]) -> VerifyResult:
    """Checks that `paths`, oldest first, form one unbroken chain, and names the first record that does not.

    If the oldest record is not the genesis record (older files were pruned), its prev is accepted as the
    anchor and the result says so: records before it cannot be vouched for.
    """
    walk = _Walk()
    files = 0
    for path in paths:
        files += 1
        lineno = 0
        problem: tuple[str, Any] | None = None
        try:
            with Path(path).open("rb") as f:
                for raw in f:
                    lineno += 1
                    problem = _check_line(raw, Path(path), walk)
                    if problem is not None:
                        break
        except OSError as exc:
            problem = (f"unreadable: {exc.strerror or exc}", None)
        if problem is not None:
            reason, seq = problem
            return walk.result(files=files, ok=False, bad_file=str(path), bad_line=lineno or None, bad_seq=seq,
                               reason=reason)
    return walk.result(files=files)


def verify_chain_files(path: Path) -> VerifyResult:
    """Verifies `path` together with its rotated siblings, oldest first."""
    return verify(chain_files(Path(path)))
