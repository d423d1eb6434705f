"""Registering a key with the platform, as one use case for the server and the command line.

A claim (a lease in the key's record) keeps two processes from registering the same pending key at once; the
attempts are reported one by one (the caller audits, counts, prints); a key the platform accepted is activated
through the same KeyChange as the admin API's and the CLI's activation. The previous key stays active until then.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from lkm import changes, genesys
from lkm.config import GenesysSettings
from lkm.errors import IllegalTransition, RegistrationError
from lkm.keys import KeyRecord, KeyState, format_time, parse_time, utcnow
from lkm.keystore import KeyStore
from lkm.lifecycle import REGISTRATION_LEASE, active_keys, without
from lkm.lifecycle_lock import store_lock

Run = Callable[..., Awaitable[Any]]
"""Runs blocking store work `run(func, *args)`: the server's worker pool, or the command line itself."""


@dataclass(frozen=True)
class Attempt:
    """One attempt to register, as the audit trail records it."""

    number: int
    max_attempts: int
    error: RegistrationError | None

    @property
    def retrying(self) -> bool:
        return self.error is not None and self.error.retryable and self.number < self.max_attempts

    def audit_details(self) -> dict[str, Any]:
        details: dict[str, Any] = {"attempt": self.number, "max_attempts": self.max_attempts}
        if self.error is not None:
            details.update(error_message=str(self.error), retrying=self.retrying)
        return details


@dataclass(frozen=True)
class Registration:
    """How a registration ended. `activated` is set when the platform took the key; otherwise it stays
    `state` because `holder` is registering it, or because of `error` (and the keys `active` stay active)."""

    key_id: str
    activated: KeyRecord | None = None
    holder: str | None = None
    error: RegistrationError | None = None
    state: KeyState | None = None
    active: str = "(none)"


async def register(store: KeyStore, settings: GenesysSettings, key_id: str, owner: str, *, run: Run,
                   on_attempt: Callable[[Attempt], Awaitable[None]],
                   apply: Callable[[changes.KeyChange], Awaitable[KeyRecord]]) -> Registration:
    """Claims, registers (retrying as configured) and activates `key_id`. The platform's refusal is an
    outcome, not an exception: it says why the key stays pending."""
    claimed = await run(claim_registration, store, key_id, owner, genesys.registration_lease_seconds(settings))
    record: KeyRecord = await run(store.get_key, key_id)
    if not claimed:
        return Registration(key_id, holder=registration_holder(record), state=record.state)

    async def attempted(number: int, error: RegistrationError | None) -> None:
        await on_attempt(Attempt(number, settings.max_attempts, error))

    try:
        await genesys.register_key(settings, record, on_attempt=attempted)
    except RegistrationError as exc:
        active: str = await run(_give_up, store, key_id, owner)
        return Registration(key_id, error=exc, state=record.state, active=active)
    return Registration(key_id, activated=await apply(changes.mark_registered(key_id)))


def _give_up(store: KeyStore, key_id: str, owner: str) -> str:
    """Releases our claim; the keys that stay active, for the message."""
    release_registration(store, key_id, owner)
    return ",".join(k.id for k in active_keys(store)) or "(none)"


# --- the claim ---------------------------------------------------------------------------------------------

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
            store.save_record(record.with_changes(extra=without(record.extra, REGISTRATION_LEASE)))


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
