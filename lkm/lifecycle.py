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

Every function here is blocking (key store I/O, key generation) and free of HTTP; the server and the CLI both
reach them through lkm.changes. Each takes an optional ChangeFacts and fills it with what the audit record
should say (states before and after, the key a promotion retired), also when it refuses. Functions that depend
on the date take `now`, so tests can move the clock without sleeping. The destruction safeguards live in
lkm.lifecycle_safeguards, the lock in lkm.lifecycle_lock, registration leases in lkm.registration.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from lkm.errors import IllegalTransition, InvalidRequest, KeyStoreError
from lkm.keys import (
    TRANSITIONS,
    KeyRecord,
    KeyState,
    check_transition,
    format_time,
    public_der_pkcs1,
    utcnow,
)
from lkm.keystore import KeyStore, same_key
from lkm.lifecycle_lock import store_lock
from lkm.lifecycle_safeguards import (
    DEFAULT_DESTRUCTION_DAYS,
    DESTRUCTION_SCHEDULED_AT,
    DISABLED_AT,
    MAX_DESTRUCTION_DAYS,
    MIN_DESTRUCTION_DAYS,
    DestructionReport,
    Safeguard,
    destruction_report,
    last_unwrap,
    safeguards,
)

__all__ = [
    "DEFAULT_DESTRUCTION_DAYS", "MAX_DESTRUCTION_DAYS", "MIN_DESTRUCTION_DAYS", "TRANSITIONS", "ChangeFacts",
    "DestructionReport", "Safeguard", "activate", "active_keys", "cancel_destruction", "check_transition",
    "create_key", "destroy", "destruction_report", "disable", "enable", "import_key", "last_unwrap",
    "mark_registered", "next_rotation_due", "public_key_sha256", "rotate", "rotate_if_due", "safeguards",
    "schedule_destruction", "store_lock", "without",
]

# Keys of KeyRecord.extra that this module owns (the safeguards read DISABLED_AT and DESTRUCTION_SCHEDULED_AT).
DISABLED_FROM = "disabled_from"
REGISTRATION_LEASE = "registration_lease"




# --- reading -------------------------------------------------------------------------------------------------

def active_keys(store: KeyStore) -> list[KeyRecord]:
    return [k for k in store.list_keys() if k.state is KeyState.ACTIVE]


def newest_active_id(store: KeyStore) -> str | None:
    """The newest active key, for a start-up message: None when there is none, or when the store cannot say yet
    (an HSM away since start-up)."""
    try:
        active = active_keys(store)
    except KeyStoreError:
        return None
    return active[-1].id if active else None


def public_key_sha256(record: KeyRecord) -> str:
    """How lkm names key material in audit records, manifests and reports: never the key itself."""
    return hashlib.sha256(record.public_key_der).hexdigest()


@dataclass
class ChangeFacts:
    """What a state change did, or was asked to do when refused: filled as the operation goes, so that its audit
    record says what was refused too. Unset facts stay None and are left out of the record."""

    from_state: KeyState | None = None
    to_state: KeyState | None = None
    previous_active: str | None = None  # comma-separated ids
    retired: str | None = None  # comma-separated ids
    public_key_sha256: str | None = None
    due: str | None = None
    scheduled: bool | None = None
    days: int | None = None
    destroy_after: str | None = None
    refused: str | None = None
    unchanged: bool | None = None

    def audit_details(self) -> dict[str, Any]:
        """The audit record's fields, built at the edge where the record is written."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value.value if isinstance(value, KeyState) else value
        return out


def _note(facts: ChangeFacts | None, **values: Any) -> None:
    if facts is not None:
        for name, value in values.items():
            if value is not None:
                setattr(facts, name, value)


def _move(store: KeyStore, record: KeyRecord, after: KeyState, facts: ChangeFacts | None, *,
          why: str = "", **changes: Any) -> KeyRecord:
    _note(facts, from_state=record.state, to_state=after)
    check_transition(record.state, after, why)
    return store.save_record(record.with_changes(state=after, **changes))


def without(extra: dict[str, Any], *names: str) -> dict[str, Any]:
    """`extra` less some of its keys (a lease released, a disable undone)."""
    return {k: v for k, v in extra.items() if k not in names}


# --- creation and rotation ---------------------------------------------------------------------------------

def create_key(store: KeyStore, *, registration: bool, label: str = "", key_id: str | None = None,
               facts: ChangeFacts | None = None) -> KeyRecord:
    """A new key. It is active at once only when nothing else is and no platform registration must come first;
    otherwise it waits in pending_activation (serving unwraps) for `activate` or a registration."""
    with store_lock(store):
        immediate = not registration and not active_keys(store)
        state = KeyState.ACTIVE if immediate else KeyState.PENDING_ACTIVATION
        record = store.create_key(state=state, label=label, key_id=key_id)
    _note(facts, to_state=record.state, public_key_sha256=public_key_sha256(record))
    return record


def rotate(store: KeyStore, *, registration: bool, label: str = "", key_id: str | None = None,
           facts: ChangeFacts | None = None) -> KeyRecord:
    """A new key that replaces the active one: at once, or (with `registration`) once the platform has it."""
    with store_lock(store):
        return _rotate_locked(store, registration=registration, label=label, key_id=key_id, facts=facts)


def _rotate_locked(store: KeyStore, *, registration: bool, label: str, key_id: str | None = None,
                   facts: ChangeFacts | None) -> KeyRecord:
    previous = active_keys(store)
    _note(facts, previous_active=",".join(k.id for k in previous) or None)
    record = store.create_key(state=KeyState.PENDING_ACTIVATION, label=label, key_id=key_id)
    _note(facts, public_key_sha256=public_key_sha256(record), to_state=record.state)
    if registration:
        return record
    return _activate_locked(store, record, facts=facts)


def next_rotation_due(keys: list[KeyRecord], every_seconds: int) -> datetime | None:
    """When the schedule next rotates: one period after the newest active or pending key was made.

    None when there is no such key (due now). A pending key counts, so a key whose registration is still being
    retried does not trigger another rotation in the meantime.
    """
    current = [k.created for k in keys if k.state in (KeyState.ACTIVE, KeyState.PENDING_ACTIVATION)]
    return max(current) + timedelta(seconds=every_seconds) if current else None


def rotate_if_due(store: KeyStore, every_seconds: int, *, registration: bool, now: datetime | None = None,
                  key_id: str | None = None, facts: ChangeFacts | None = None) -> KeyRecord | None:
    """The scheduled rotation, safe to run from several servers sharing one store: the due time is checked
    inside the store's lock, so the second server to get there sees the first one's key and stops. (The server
    looks without the lock first, lkm.keyadmin, so a period with nothing due takes no lock.)"""
    now = now or utcnow()
    with store_lock(store):
        due = next_rotation_due(store.list_keys(), every_seconds)
        if due is not None and due > now:
            return None
        _note(facts, due=format_time(due) if due else "no active key", scheduled=True)
        return _rotate_locked(store, registration=registration, label="scheduled rotation", key_id=key_id,
                              facts=facts)


# --- activation and registration leases --------------------------------------------------------------------

def activate(store: KeyStore, key_id: str, *, facts: ChangeFacts | None = None) -> KeyRecord:
    """pending_activation -> active, once the platform has the key; the previously active key retires."""
    with store_lock(store):
        record = store.get_key(key_id)
        if record.state is KeyState.ACTIVE:
            _note(facts, from_state=KeyState.ACTIVE, to_state=KeyState.ACTIVE)
            return record
        if record.state is not KeyState.PENDING_ACTIVATION:
            _note(facts, from_state=record.state, to_state=KeyState.ACTIVE)
            raise IllegalTransition(f"cannot go from {record.state.value} to active: only a key pending "
                                    f"activation is activated (a disabled key comes back with enable)")
        return _activate_locked(store, record, facts=facts)


def _activate_locked(store: KeyStore, record: KeyRecord, *, facts: ChangeFacts | None) -> KeyRecord:
    # The new key first: a crash in between leaves two active keys (healed by the next activation; the newest
    # is used meanwhile), never none.
    activated = _move(store, record, KeyState.ACTIVE, facts, extra=without(record.extra, REGISTRATION_LEASE))
    retired = []
    for other in active_keys(store):
        if other.id != activated.id:
            check_transition(other.state, KeyState.RETIRED)
            store.save_record(other.with_changes(state=KeyState.RETIRED))
            retired.append(other.id)
    _note(facts, retired=",".join(retired) or None)
    return activated


def mark_registered(store: KeyStore, key_id: str, *, now: datetime | None = None,
                    facts: ChangeFacts | None = None) -> KeyRecord:
    """The platform accepted the key: record when, and activate it if it was waiting for that."""
    with store_lock(store):
        record = store.get_key(key_id)
        record = store.save_record(record.with_changes(registered=now or utcnow(),
                                                       extra=without(record.extra, REGISTRATION_LEASE)))
        if record.state is KeyState.PENDING_ACTIVATION:
            return _activate_locked(store, record, facts=facts)
        _note(facts, from_state=record.state, to_state=record.state)
        return record


# --- disable and enable ------------------------------------------------------------------------------------

def disable(store: KeyStore, key_id: str, *, force: bool = False, now: datetime | None = None,
            facts: ChangeFacts | None = None) -> KeyRecord:
    """The customer's cut-off: unwraps with the key are refused until it is enabled again."""
    with store_lock(store):
        record = store.get_key(key_id)
        if record.state in (KeyState.DISABLED, KeyState.PENDING_DESTRUCTION):
            # Already refused for unwrap; a scheduled destruction stays as it is (cancel-destruction undoes it).
            _note(facts, from_state=record.state, to_state=record.state)
            return record
        if record.state is KeyState.ACTIVE and not force:
            _note(facts, from_state=KeyState.ACTIVE, to_state=KeyState.DISABLED)
            raise IllegalTransition("cannot go from active to disabled without force: the platform wraps new "
                                    "recordings with this key; rotate first, or force an emergency cut-off")
        extra = {**record.extra, DISABLED_FROM: record.state.value, DISABLED_AT: format_time(now or utcnow())}
        return _move(store, record, KeyState.DISABLED, facts, extra=extra)


def enable(store: KeyStore, key_id: str, *, facts: ChangeFacts | None = None) -> KeyRecord:
    """Undoes disable: back to the state the key had, except that a formerly active key comes back retired
    when another key became active meanwhile (one active key per store)."""
    with store_lock(store):
        record = store.get_key(key_id)
        if record.state is not KeyState.DISABLED:
            _note(facts, from_state=record.state)
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
        return _move(store, record, after, facts, extra=without(record.extra, DISABLED_FROM, DISABLED_AT))


# --- destruction ---------------------------------------------------------------------------------------------

def schedule_destruction(store: KeyStore, key_id: str, *, days: int = DEFAULT_DESTRUCTION_DAYS,
                         now: datetime | None = None, facts: ChangeFacts | None = None) -> KeyRecord:
    if isinstance(days, bool) or not isinstance(days, int) or not \
            MIN_DESTRUCTION_DAYS <= days <= MAX_DESTRUCTION_DAYS:
        raise InvalidRequest(f"the waiting period must be {MIN_DESTRUCTION_DAYS} to {MAX_DESTRUCTION_DAYS} "
                             f"days, got {days!r}", code="invalid_waiting_period")
    now = now or utcnow()
    with store_lock(store):
        record = store.get_key(key_id)
        after = now + timedelta(days=days)
        _note(facts, days=days, destroy_after=format_time(after))
        why = "disable the key first" if record.state is not KeyState.PENDING_DESTRUCTION else \
            "destruction is already scheduled (cancel it to change the date)"
        extra = {**record.extra, DESTRUCTION_SCHEDULED_AT: format_time(now)}
        return _move(store, record, KeyState.PENDING_DESTRUCTION, facts, why=why, destroy_after=after,
                     extra=extra)


def cancel_destruction(store: KeyStore, key_id: str, *, facts: ChangeFacts | None = None) -> KeyRecord:
    with store_lock(store):
        record = store.get_key(key_id)
        if record.state is not KeyState.PENDING_DESTRUCTION:
            _note(facts, from_state=record.state, to_state=KeyState.DISABLED)
            raise IllegalTransition(f"cannot cancel destruction of a {record.state.value} key: none is "
                                    f"scheduled")
        return _move(store, record, KeyState.DISABLED, facts, destroy_after=None,
                     extra=without(record.extra, DESTRUCTION_SCHEDULED_AT))


def destroy(store: KeyStore, key_id: str, *, now: datetime | None = None,
            facts: ChangeFacts | None = None) -> KeyRecord:
    """Erases the private half for good once every safeguard holds, judged inside the lock at this moment."""
    with store_lock(store):
        record = store.get_key(key_id)
        checks = safeguards(record, now or utcnow())
        _note(facts, from_state=record.state, to_state=KeyState.DESTROYED)
        failed = [s for s in checks if not s.ok]
        if failed:
            _note(facts, refused="; ".join(s.name for s in failed))
            raise IllegalTransition(f"cannot go from {record.state.value} to destroyed: "
                                    + "; ".join(f"{s.name}: {s.detail}" for s in failed))
        check_transition(record.state, KeyState.DESTROYED)
        return store.destroy_private(record.id)


# --- import --------------------------------------------------------------------------------------------------

IMPORT_STATES = (KeyState.ACTIVE, KeyState.RETIRED, KeyState.DISABLED, KeyState.PENDING_ACTIVATION)


def import_key(store: KeyStore, key_id: str, private_key: rsa.RSAPrivateKey, *, state: KeyState | None = None,
               label: str = "", facts: ChangeFacts | None = None) -> tuple[KeyRecord, bool]:
    """Brings in a key that already exists elsewhere (the platform's sample): (record, True if new).

    Its id is kept, so recordings wrapped with it stay readable. An id that is taken is refused unless the
    material is identical (then nothing changes). Without `state` the key is active if no key is, else
    retired; `active` is refused while another key is active (rotate instead).
    """
    if state is not None and state not in IMPORT_STATES:
        raise InvalidRequest(f"an imported key starts as one of {', '.join(s.value for s in IMPORT_STATES)}, "
                             f"not {state.value}", code="invalid_state")
    public = public_der_pkcs1(private_key.public_key())
    _note(facts, public_key_sha256=hashlib.sha256(public).hexdigest())
    with store_lock(store):
        existing = {k.id: k for k in store.list_keys()}
        current = existing.get(key_id)
        if current is not None:
            record = same_key(current, public)  # the same key imported again, else Conflict
            _note(facts, unchanged=True)
            return record, False
        active = [k.id for k in existing.values() if k.state is KeyState.ACTIVE]
        if state is None:
            state = KeyState.RETIRED if active else KeyState.ACTIVE
        elif state is KeyState.ACTIVE and active:
            raise IllegalTransition(f"cannot import {key_id} as active: key {active[0]} is active (import it as "
                                    f"retired, or rotate)")
        _note(facts, to_state=state)
        record = store.import_key(key_id, private_key, state=state, label=label)
        return record, True
