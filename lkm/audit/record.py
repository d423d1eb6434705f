"""The record format of the audit trail: what an event may hold, how a record is sealed into the chain.

Each record carries `prev`, the SHA-256 of the previous record's exact line bytes, and `hash`, the SHA-256 of
its own canonical form without `hash` (lkm.canonical: the same bytes for the line and for the hash, so
verification can recompute both). Records never hold key material or ciphertexts: an event naming a
FORBIDDEN_FIELDS key anywhere is refused before it reaches the chain.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import math
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, NewType

from lkm.canonical import canonical_json, canonical_text

__all__ = [
    "FIRST_SEQ",
    "FORBIDDEN_FIELDS",
    "GENESIS",
    "GENESIS_PREV",
    "INTENT_FIELD",
    "RESERVED_FIELDS",
    "AuditAction",
    "AuditOutcome",
    "Head",
    "PreparedEvent",
    "local_actor",
    "prepare",
    "seal",
    "sha256_hex",
    "utc_timestamp",
]

GENESIS_PREV: Final = "0" * 64
FIRST_SEQ: Final = 1

# Compared case-insensitively against every key at every depth. "key_id" is fine; "key" is not.
FORBIDDEN_FIELDS: Final[frozenset[str]] = frozenset({
    "key",
    "key_material",
    "wrapped_key",
    "unwrapped_key",
    "private_key",
    "plaintext",
    "ciphertext",
    "body",
    "secret",
    "password",
})

# Set by the chain itself; a caller supplying them could forge the chain's bookkeeping.
RESERVED_FIELDS: Final[frozenset[str]] = frozenset({"seq", "prev", "hash"})


class AuditAction(StrEnum):
    """Every `action` lkm writes to the trail; the values are what auditors search for, so they never change."""

    UNWRAP = "unwrap"
    AUTHENTICATE = "authenticate"
    AUTHORIZE = "authorize"
    CREATE_KEY = "create_key"
    IMPORT_KEY = "import_key"
    ROTATE_KEY = "rotate_key"
    REGISTER_KEY = "register_key"
    ACTIVATE_KEY = "activate_key"
    DISABLE_KEY = "disable_key"
    ENABLE_KEY = "enable_key"
    SCHEDULE_DESTRUCTION = "schedule_destruction"
    CANCEL_DESTRUCTION = "cancel_destruction"
    DESTROY_KEY = "destroy_key"
    DESTROY_KEY_DRY_RUN = "destroy_key_dry_run"
    BACKUP_CREATE = "backup_create"
    BACKUP_RESTORE = "backup_restore"
    RESTORE_KEY = "restore_key"
    MIGRATE_KEY = "migrate_key"
    HAWK_CREATE = "hawk_create"
    HAWK_REVOKE = "hawk_revoke"
    FREEZE_CALLER = "freeze_caller"
    UNFREEZE_CALLER = "unfreeze_caller"


class AuditOutcome(StrEnum):
    """The `outcome` of a record: done, failed (with an `error_code`), or refused before anything was tried.

    INTENT is written, durably, before a change is made; the record of its outcome carries the same `intent`
    id. A crash between the two leaves an intent without an outcome, which verification reports: no change
    can happen without a record of it.
    """

    OK = "ok"
    ERROR = "error"
    DENIED = "denied"
    INTENT = "intent"


INTENT_FIELD: Final = "intent"
"""The field pairing an intent record with the record of its outcome."""


PreparedEvent = NewType("PreparedEvent", dict[str, Any])
"""An event checked and snapshotted by prepare(): only these reach the chain."""


@dataclass(frozen=True)
class Head:
    """The chain's end: the last record's seq and the SHA-256 of its line (the next record's prev)."""

    seq: int
    digest: str


GENESIS: Final = Head(FIRST_SEQ - 1, GENESIS_PREV)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_second_prefix: tuple[int, str] = (-1, "")  # the last second formatted, and its text up to the dot


def utc_timestamp(now: datetime | None = None) -> str:
    """RFC 3339 UTC with milliseconds: sortable as text and unambiguous across hosts.

    Every audited request stamps one, so the current time reuses the last second's formatted text.
    """
    if now is not None:
        dt = now.astimezone(UTC)
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
    global _second_prefix  # noqa: PLW0603 - one tuple, replaced whole, so readers on any thread see a pair
    ns = time.time_ns()
    second, millis = divmod(ns // 1_000_000, 1000)
    cached_second, prefix = _second_prefix
    if second != cached_second:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
        _second_prefix = (second, prefix)
    return f"{prefix}{millis:03d}Z"


def local_actor() -> dict[str, Any]:
    """Who ran the CLI: the OS account is the only identity a local operator has."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name in the environment nor in the password database
        user = str(os.getuid())
    return {"kind": "cli", "user": user, "host": socket.gethostname(), "pid": os.getpid()}


def _find_forbidden(obj: Any, where: str = "") -> str | None:
    if isinstance(obj, Mapping):
        for name, value in obj.items():
            here = f"{where}.{name}" if where else str(name)
            if str(name).lower() in FORBIDDEN_FIELDS:
                return here
            found = _find_forbidden(value, here)
            if found is not None:
                return found
    elif isinstance(obj, list | tuple):
        for index, value in enumerate(obj):
            found = _find_forbidden(value, f"{where}[{index}]")
            if found is not None:
                return found
    return None


class _Refused(Exception):
    """A value _snapshot cannot copy as it is; prepare() then takes the general path for the exact error."""


_PLAIN: Final = (str, int, float, type(None))
_ALLOWED_NAMES: set[str] = set()  # field names already checked against FORBIDDEN_FIELDS (lkm's own, a few dozen)
_ALLOWED_NAMES_MAX: Final = 4096  # past this, names are checked each time: the set never grows without bound


def _snapshot(obj: dict[Any, Any] | Mapping[str, Any]) -> dict[str, Any]:
    """A copy of an event made of plain JSON values (str keys, str, int, float, bool, None, dicts), with no
    forbidden field: the common event in one pass, without serializing it and parsing it back.
    Anything else (a forbidden name, a list, an int enum, NaN, an unknown type) raises _Refused."""
    copy: dict[str, Any] = {}
    for name, value in obj.items():
        if type(name) is not str or name not in _ALLOWED_NAMES:
            if type(name) is not str or name.lower() in FORBIDDEN_FIELDS:
                raise _Refused
            if len(_ALLOWED_NAMES) < _ALLOWED_NAMES_MAX:
                _ALLOWED_NAMES.add(name)
        kind = type(value)
        if kind in _PLAIN:
            if kind is float and not math.isfinite(value):  # NaN and infinities are not JSON
                raise _Refused
            copy[name] = value
        elif kind is bool:
            copy[name] = value
        elif isinstance(value, str):  # a StrEnum: its text, as JSON would write it
            copy[name] = str.__str__(value)
        elif kind is dict:
            copy[name] = _snapshot(value)
        else:
            raise _Refused
    return copy


def prepare(event: Mapping[str, Any]) -> PreparedEvent:
    """Checks and snapshots an event in the caller's context, so a bad event fails its caller alone
    (not the whole batch it would have joined) and later mutation by the caller cannot change it."""
    if not isinstance(event, Mapping):
        raise TypeError(f"an audit event is a mapping, not {type(event).__name__}")
    body: dict[str, Any]
    try:
        body = _snapshot(event)
    except _Refused:
        forbidden = _find_forbidden(event)
        if forbidden is not None:
            # Name the field, never its value: the value is what must not leak.
            raise ValueError(f"audit events must not carry key material or payloads: field {forbidden!r}") from None
        body = json.loads(canonical_json(dict(event)))
    if not RESERVED_FIELDS.isdisjoint(body):
        raise ValueError(f"audit event fields {sorted(RESERVED_FIELDS & set(body))} are set by the audit chain "
                         "itself")
    body.setdefault("time", utc_timestamp())
    return PreparedEvent(body)


def seal(body: PreparedEvent, head: Head) -> tuple[bytes, Head]:
    """The record's line (newline included) chained after `head`, and the head it leaves.

    The record's hash covers its canonical JSON without "hash"; the line is the same JSON with "hash" in its
    sorted place. Both come from one serialization of the fields either side of that place, byte for byte what
    serializing the record twice gives (the sorted keys put every field before "hash" ahead of every one after).
    """
    early: dict[str, Any] = {}
    late: dict[str, Any] = {"prev": head.digest, "seq": head.seq + 1}  # the event cannot hold these (prepare)
    for name, value in body.items():
        (early if name < "hash" else late)[name] = value
    before = canonical_text(early)
    after = canonical_text(late)
    opening = "{" if before == "{}" else before[:-1] + ","
    closing = "}" if after == "{}" else "," + after[1:]
    unsealed = (before[:-1] + closing if before != "{}" else after).encode("utf-8")
    line = f'{opening}"hash":"{sha256_hex(unsealed)}"{closing}\n'.encode()
    return line, Head(head.seq + 1, sha256_hex(line[:-1]))
