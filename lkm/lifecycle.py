"""The key lifecycle: which state changes are allowed, and the operations that make them.

    pending_activation ──activate──> active ──(a newer key activated)──> retired
           │                          │ (force)                            │
           └─────────── disable ──────┴────────────> disabled <────────────┘
                                                 enable │ ▲ cancel
                                       schedule (7 d+)  ▼ │
                                                  pending_destruction ──(period passed)──> destroyed

TRANSITIONS is the one place that says which moves exist; every operation below changes a state through
`_move`, which refuses anything else with a message naming both states. The operations add the rules a table
cannot hold (disabling the active key needs `force`; destruction needs its waiting period to have passed).

Invariant: at most one key per store is `active`, the key the platform was told about last (it wraps new
recordings with the most recently registered key). Activating a key retires every other active key, under the
store's cross-process lock, so a crash or a race between processes cannot leave two behind.

Every function here is blocking (key store I/O, key generation) and free of HTTP; the server runs them in its
worker pool through KeyService.audited, the CLI calls them directly. Each takes an optional `details` dict and
fills it with what the audit record should say (states before and after, the key a promotion retired), also
when it refuses. Functions that depend on the date take `now`, so tests can move the clock without sleeping.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric import rsa

from lkm.errors import Conflict, IllegalTransition, InvalidRequest
from lkm.keys import (  # noqa: F401 - TRANSITIONS is re-exported: lifecycle.TRANSITIONS keeps working
    TRANSITIONS,
    KeyRecord,
    KeyState,
    check_transition,
    format_time,
    parse_time,
    public_der_pkcs1,
    utcnow,
)
from lkm.keystore import KeyStore

DEFAULT_DESTRUCTION_DAYS = 30
MIN_DESTRUCTION_DAYS = 7
MAX_DESTRUCTION_DAYS = 3650

# Keys of KeyRecord.extra that this module owns.
DISABLED_FROM = "disabled_from"
DISABLED_AT = "disabled_at"
DESTRUCTION_SCHEDULED_AT = "destruction_scheduled_at"
REGISTRATION_LEASE = "registration_lease"


# --- locking -------------------------------------------------------------------------------------------------

@runtime_checkable
class LockingStore(Protocol):
    def lock(self) -> AbstractContextManager[Any]:
        """An exclusive section shared by every process using this store (re-entrant in one thread)."""
        ...


@contextlib.contextmanager
def store_lock(store: KeyStore) -> Iterator[None]:
    """The store's cross-process lock when it has one (the file store's flock).

    Inside it the store is refreshed, so every check sees what other processes wrote before we got the lock. A
    store without one (PKCS#11) gets no cross-process exclusion here; the server serializes its own changes
    (lkm.keyadmin), and the README tells HSM users to let one server run the rotation schedule.
    """
    guard: AbstractContextManager[Any] = store.lock() if isinstance(store, LockingStore) else \
        contextlib.nullcontext()
    with guard:
        store.refresh()
        yield


# --- reading -------------------------------------------------------------------------------------------------

def active_keys(store: KeyStore) -> list[KeyRecord]:
    return [k for k in store.list_keys() if k.state is KeyState.ACTIVE]


def public_key_sha256(record: KeyRecord) -> str:
    """How lkm names key material in audit records, manifests and reports: never the key itself."""
    return hashlib.sha256(record.public_key_der).hexdigest()


def _note(details: dict[str, Any] | None, **facts: Any) -> None:
    if details is not None:
        details.update({k: v for k, v in facts.items() if v is not None})


def _move(store: KeyStore, record: KeyRecord, after: KeyState, details: dict[str, Any] | None, *,
          why: str = "", **changes: Any) -> KeyRecord:
    _note(details, from_state=record.state.value, to_state=after.value)
    check_transition(record.state, after, why)
    return store.save_record(record.with_changes(state=after, **changes))


def _without(extra: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in extra.items() if k not in names}


# --- creation and rotation ---------------------------------------------------------------------------------

def create_key(store: KeyStore, *, registration: bool, label: str = "",
               details: dict[str, Any] | None = None) -> KeyRecord:
    """A new key. It is active at once only when nothing else is and no platform registration must come first;
    otherwise it waits in pending_activation (serving unwraps) for `activate` or a registration."""
    with store_lock(store):
        immediate = not registration and not active_keys(store)
        state = KeyState.ACTIVE if immediate else KeyState.PENDING_ACTIVATION
        record = store.create_key(state=state, label=label)
    _note(details, to_state=record.state.value, public_key_sha256=public_key_sha256(record))
    return record


def rotate(store: KeyStore, *, registration: bool, label: str = "",
           details: dict[str, Any] | None = None) -> KeyRecord:
    """A new key that replaces the active one: at once, or (with `registration`) once the platform has it."""
    with store_lock(store):
        return _rotate_locked(store, registration=registration, label=label, details=details)


def _rotate_locked(store: KeyStore, *, registration: bool, label: str,
                   details: dict[str, Any] | None) -> KeyRecord:
    previous = active_keys(store)
    _note(details, previous_active=",".join(k.id for k in previous) or None)
    record = store.create_key(state=KeyState.PENDING_ACTIVATION, label=label)
    _note(details, public_key_sha256=public_key_sha256(record), to_state=record.state.value)
    if registration:
        return record
    return _activate_locked(store, record, details=details)


def next_rotation_due(keys: list[KeyRecord], every_seconds: int) -> datetime | None:
    """When the schedule next rotates: one period after the newest active or pending key was made.

    None when there is no such key (due now). A pending key counts, so a key whose registration is still being
    retried does not trigger another rotation in the meantime.
    """
    current = [k.created for k in keys if k.state in (KeyState.ACTIVE, KeyState.PENDING_ACTIVATION)]
    return max(current) + timedelta(seconds=every_seconds) if current else None


def rotate_if_due(store: KeyStore, every_seconds: int, *, registration: bool, now: datetime | None = None,
                  details: dict[str, Any] | None = None) -> KeyRecord | None:
    """The scheduled rotation, safe to run from several servers sharing one store: the due time is checked
    inside the store's lock, so the second server to get there sees the first one's key and stops. (The server
    looks without the lock first, lkm.keyadmin, so a period with nothing due takes no lock.)"""
    now = now or utcnow()
    with store_lock(store):
        due = next_rotation_due(store.list_keys(), every_seconds)
        if due is not None and due > now:
            return None
        _note(details, due=format_time(due) if due else "no active key", scheduled=True)
        return _rotate_locked(store, registration=registration, label="scheduled rotation", details=details)


# --- activation and registration leases --------------------------------------------------------------------

def activate(store: KeyStore, key_id: str, *, details: dict[str, Any] | None = None) -> KeyRecord:
    """pending_activation -> active, once the platform has the key; the previously active key retires."""
    with store_lock(store):
        record = store.get_key(key_id)
        if record.state is KeyState.ACTIVE:
            _note(details, from_state="active", to_state="active")
            return record
        if record.state is not KeyState.PENDING_ACTIVATION:
            _note(details, from_state=record.state.value, to_state="active")
            raise IllegalTransition(f"cannot go from {record.state.value} to active: only a key pending "
                                    f"activation is activated (a disabled key comes back with enable)")
        return _activate_locked(store, record, details=details)


def _activate_locked(store: KeyStore, record: KeyRecord, *, details: dict[str, Any] | None) -> KeyRecord:
    # The new key first: a crash in between leaves two active keys (healed by the next activation; the newest
    # is used meanwhile), never none.
    activated = _move(store, record, KeyState.ACTIVE, details, extra=_without(record.extra, REGISTRATION_LEASE))
    retired = []
    for other in active_keys(store):
        if other.id != activated.id:
            check_transition(other.state, KeyState.RETIRED)
            store.save_record(other.with_changes(state=KeyState.RETIRED))
            retired.append(other.id)
    _note(details, retired=",".join(retired) or None)
    return activated


def mark_registered(store: KeyStore, key_id: str, *, now: datetime | None = None,
                    details: dict[str, Any] | None = None) -> KeyRecord:
    """The platform accepted the key: record when, and activate it if it was waiting for that."""
    with store_lock(store):
        record = store.get_key(key_id)
        record = store.save_record(record.with_changes(registered=now or utcnow(),
                                                       extra=_without(record.extra, REGISTRATION_LEASE)))
        if record.state is KeyState.PENDING_ACTIVATION:
            return _activate_locked(store, record, details=details)
        _note(details, from_state=record.state.value, to_state=record.state.value)
        return record


def claim_registration(store: KeyStore, key_id: str, owner: str, seconds: float, *,
                       now: datetime | None = None) -> bool:
    """Takes the right to register `key_id` for `seconds`, so two servers starting together do not both
    register the same pending key. False when someone else holds an unexpired claim."""
    now = now or utcnow()
    with store_lock(store):
        record = store.get_key(key_id)
        if record.state not in (KeyState.PENDING_ACTIVATION, KeyState.ACTIVE):
            raise IllegalTransition(f"cannot go from {record.state.value} to active: only a key pending "
                                    f"activation (or the active key) is registered with the platform")
        holder = registration_holder(record, now)
        if holder is not None and holder != owner:
            return False
        extra = {**record.extra, REGISTRATION_LEASE: {"owner": owner,
                                                      "until": format_time(now + timedelta(seconds=seconds))}}
        store.save_record(record.with_changes(extra=extra))
        return True


def release_registration(store: KeyStore, key_id: str, owner: str) -> None:
    with store_lock(store):
        record = store.get_key(key_id)
        lease = record.extra.get(REGISTRATION_LEASE)
        if isinstance(lease, dict) and lease.get("owner") == owner:
            store.save_record(record.with_changes(extra=_without(record.extra, REGISTRATION_LEASE)))


def registration_holder(record: KeyRecord, now: datetime | None = None) -> str | None:
    lease = record.extra.get(REGISTRATION_LEASE)
    if not isinstance(lease, dict):
        return None
    try:
        if parse_time(str(lease.get("until"))) <= (now or utcnow()):
            return None
    except ValueError:
        return None
    return str(lease.get("owner"))


# --- disable and enable ------------------------------------------------------------------------------------

def disable(store: KeyStore, key_id: str, *, force: bool = False, now: datetime | None = None,
            details: dict[str, Any] | None = None) -> KeyRecord:
    """The customer's cut-off: unwraps with the key are refused until it is enabled again."""
    with store_lock(store):
        record = store.get_key(key_id)
        if record.state in (KeyState.DISABLED, KeyState.PENDING_DESTRUCTION):
            # Already refused for unwrap; a scheduled destruction stays as it is (cancel-destruction undoes it).
            _note(details, from_state=record.state.value, to_state=record.state.value)
            return record
        if record.state is KeyState.ACTIVE and not force:
            _note(details, from_state="active", to_state="disabled")
            raise IllegalTransition("cannot go from active to disabled without force: the platform wraps new "
                                    "recordings with this key; rotate first, or force an emergency cut-off")
        extra = {**record.extra, DISABLED_FROM: record.state.value, DISABLED_AT: format_time(now or utcnow())}
        return _move(store, record, KeyState.DISABLED, details, extra=extra)


def enable(store: KeyStore, key_id: str, *, details: dict[str, Any] | None = None) -> KeyRecord:
    """Undoes disable: back to the state the key had, except that a formerly active key comes back retired
    when another key became active meanwhile (one active key per store)."""
    with store_lock(store):
        record = store.get_key(key_id)
        if record.state is not KeyState.DISABLED:
            _note(details, from_state=record.state.value)
            if record.state is KeyState.PENDING_DESTRUCTION:
                raise IllegalTransition("cannot enable a pending_destruction key: cancel the destruction first "
                                        "(it returns the key to disabled)")
            raise IllegalTransition(f"cannot enable a {record.state.value} key: only a disabled key is enabled")
        before = str(record.extra.get(DISABLED_FROM, KeyState.RETIRED.value))
        after = KeyState.RETIRED
        if before == KeyState.PENDING_ACTIVATION.value:
            after = KeyState.PENDING_ACTIVATION
        elif before == KeyState.ACTIVE.value and not active_keys(store):
            after = KeyState.ACTIVE
        return _move(store, record, after, details, extra=_without(record.extra, DISABLED_FROM, DISABLED_AT))


# --- destruction ---------------------------------------------------------------------------------------------

def schedule_destruction(store: KeyStore, key_id: str, *, days: int = DEFAULT_DESTRUCTION_DAYS,
                         now: datetime | None = None, details: dict[str, Any] | None = None) -> KeyRecord:
    if isinstance(days, bool) or not isinstance(days, int) or not \
            MIN_DESTRUCTION_DAYS <= days <= MAX_DESTRUCTION_DAYS:
        raise InvalidRequest(f"the waiting period must be {MIN_DESTRUCTION_DAYS} to {MAX_DESTRUCTION_DAYS} "
                             f"days, got {days!r}", code="invalid_waiting_period")
    now = now or utcnow()
    with store_lock(store):
        record = store.get_key(key_id)
        after = now + timedelta(days=days)
        _note(details, days=days, destroy_after=format_time(after))
        why = "disable the key first" if record.state is not KeyState.PENDING_DESTRUCTION else \
            "destruction is already scheduled (cancel it to change the date)"
        extra = {**record.extra, DESTRUCTION_SCHEDULED_AT: format_time(now)}
        return _move(store, record, KeyState.PENDING_DESTRUCTION, details, why=why, destroy_after=after,
                     extra=extra)


def cancel_destruction(store: KeyStore, key_id: str, *, details: dict[str, Any] | None = None) -> KeyRecord:
    with store_lock(store):
        record = store.get_key(key_id)
        if record.state is not KeyState.PENDING_DESTRUCTION:
            _note(details, from_state=record.state.value, to_state="disabled")
            raise IllegalTransition(f"cannot cancel destruction of a {record.state.value} key: none is "
                                    f"scheduled")
        return _move(store, record, KeyState.DISABLED, details, destroy_after=None,
                     extra=_without(record.extra, DESTRUCTION_SCHEDULED_AT))


@dataclass(frozen=True)
class Safeguard:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class DestructionReport:
    key: KeyRecord
    safeguards: tuple[Safeguard, ...]
    last_unwrap: datetime | None
    audit_since: datetime | None  # the oldest audit record searched; None when the trail is empty

    @property
    def allowed(self) -> bool:
        return all(s.ok for s in self.safeguards)

    def last_unwrap_text(self) -> str:
        if self.last_unwrap is not None:
            return format_time(self.last_unwrap)
        since = f" since {format_time(self.audit_since)}" if self.audit_since else ""
        return f"never (no unwrap with this key in the audit trail{since})"


def safeguards(record: KeyRecord, now: datetime) -> tuple[Safeguard, ...]:
    """All four conditions of the issue, each judged on the stored record and the clock at this moment."""
    state = record.state
    # pending_destruction is reachable from disabled only (TRANSITIONS), so both states prove it.
    was_disabled = state in (KeyState.DISABLED, KeyState.PENDING_DESTRUCTION)
    disabled_at = record.extra.get(DISABLED_AT)
    scheduled_at = record.extra.get(DESTRUCTION_SCHEDULED_AT)
    after = record.destroy_after
    scheduled = state is KeyState.PENDING_DESTRUCTION and after is not None
    period_ok = False
    period_detail = "no destruction scheduled"
    if scheduled and after is not None:
        waited = (after - parse_time(scheduled_at)) if isinstance(scheduled_at, str) else None
        if waited is None:
            period_detail = "when the destruction was scheduled is unknown; cancel and schedule it again"
        elif waited < timedelta(days=MIN_DESTRUCTION_DAYS):
            period_detail = f"the scheduled waiting period is shorter than {MIN_DESTRUCTION_DAYS} days"
        elif now < after:
            period_detail = f"the waiting period ends {format_time(after)}"
        else:
            period_ok, period_detail = True, f"ended {format_time(after)}"
    return (
        Safeguard("not active", state not in (KeyState.ACTIVE, KeyState.PENDING_ACTIVATION),
                  f"state is {state.value}"),
        Safeguard("disabled first", was_disabled,
                  (f"disabled {disabled_at}" if disabled_at else "disabled") if was_disabled else
                  "the key was never disabled"),
        Safeguard("destruction scheduled", scheduled,
                  f"scheduled {scheduled_at}" if scheduled else "no destruction scheduled"),
        Safeguard("waiting period passed", period_ok, period_detail),
    )


def destruction_report(store: KeyStore, key_id: str, *, audit_path: Path | None,
                       now: datetime | None = None) -> DestructionReport:
    """What `destroy` would decide now, plus when the key last unwrapped (from the audit trail)."""
    record = store.get_key(key_id)
    last, since = last_unwrap(audit_path, record.id) if audit_path else (None, None)
    return DestructionReport(record, safeguards(record, now or utcnow()), last, since)


def destroy(store: KeyStore, key_id: str, *, now: datetime | None = None,
            details: dict[str, Any] | None = None) -> KeyRecord:
    """Erases the private half for good once every safeguard holds, judged inside the lock at this moment."""
    with store_lock(store):
        record = store.get_key(key_id)
        checks = safeguards(record, now or utcnow())
        _note(details, from_state=record.state.value, to_state=KeyState.DESTROYED.value)
        failed = [s for s in checks if not s.ok]
        if failed:
            _note(details, refused="; ".join(s.name for s in failed))
            raise IllegalTransition(f"cannot go from {record.state.value} to destroyed: "
                                    + "; ".join(f"{s.name}: {s.detail}" for s in failed))
        check_transition(record.state, KeyState.DESTROYED)
        return store.destroy_private(record.id)


def last_unwrap(audit_path: Path, key_id: str) -> tuple[datetime | None, datetime | None]:
    """(time of the last successful unwrap with `key_id`, time of the oldest audit record searched)."""
    from lkm.audit import chain_files  # noqa: PLC0415 - the audit module is only needed for this report

    needle = key_id.encode()
    last: datetime | None = None
    oldest: datetime | None = None
    for path in chain_files(audit_path):
        try:
            with path.open("rb") as f:
                for raw in f:
                    if oldest is None:
                        oldest = _record_time(raw)
                    if needle not in raw or b'"unwrap"' not in raw:
                        continue
                    try:
                        rec = json.loads(raw)
                    except ValueError:
                        continue
                    if rec.get("action") == "unwrap" and rec.get("key_id") == key_id and rec.get("outcome") == "ok":
                        last = _doc_time(rec) or last
        except FileNotFoundError:
            continue
    return last, oldest


def _record_time(raw: bytes) -> datetime | None:
    try:
        return _doc_time(json.loads(raw))
    except ValueError:
        return None


def _doc_time(doc: Any) -> datetime | None:
    try:
        value = doc.get("time")
        return parse_time(value) if isinstance(value, str) else None
    except (ValueError, AttributeError):
        return None


# --- import --------------------------------------------------------------------------------------------------

IMPORT_STATES = (KeyState.ACTIVE, KeyState.RETIRED, KeyState.DISABLED, KeyState.PENDING_ACTIVATION)


def import_key(store: KeyStore, key_id: str, private_key: rsa.RSAPrivateKey, *, state: KeyState | None = None,
               label: str = "", details: dict[str, Any] | None = None) -> tuple[KeyRecord, bool]:
    """Brings in a key that already exists elsewhere (the platform's sample): (record, True if new).

    Its id is kept, so recordings wrapped with it stay readable. An id that is taken is refused unless the
    material is identical (then nothing changes). Without `state` the key is active if no key is, else
    retired; `active` is refused while another key is active (rotate instead).
    """
    if state is not None and state not in IMPORT_STATES:
        raise InvalidRequest(f"an imported key starts as one of {', '.join(s.value for s in IMPORT_STATES)}, "
                             f"not {state.value}", code="invalid_state")
    public = public_der_pkcs1(private_key.public_key())
    _note(details, public_key_sha256=hashlib.sha256(public).hexdigest())
    with store_lock(store):
        existing = {k.id: k for k in store.list_keys()}
        current = existing.get(key_id)
        if current is not None:
            if current.public_key_der != public:
                raise Conflict(f"key {key_id} already exists with different key material", code="key_exists")
            _note(details, unchanged=True)
            return current, False
        active = [k.id for k in existing.values() if k.state is KeyState.ACTIVE]
        if state is None:
            state = KeyState.RETIRED if active else KeyState.ACTIVE
        elif state is KeyState.ACTIVE and active:
            raise IllegalTransition(f"cannot import {key_id} as active: key {active[0]} is active (import it as "
                                    f"retired, or rotate)")
        _note(details, to_state=state.value)
        record = store.import_key(key_id, private_key, state=state, label=label)
        return record, True
