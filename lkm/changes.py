"""The key state changes as use cases: which lifecycle operation each audit action runs, in one place.

The admin API (lkm.keyadmin) and the command line (lkm.cli) build the same KeyChange for the same request, and
each applies it with its own way of running blocking work and writing the audit record: what is changed, how,
and what the record says cannot drift apart between them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from lkm import lifecycle
from lkm.audit.record import AuditAction
from lkm.keys import KeyRecord, new_key_id
from lkm.keystore import KeyStore
from lkm.lifecycle import ChangeFacts


@dataclass(frozen=True)
class KeyChange:
    """One audited change: its audit action, the key it is about (for a key it creates, the id chosen for it),
    the operation."""

    action: AuditAction
    key_id: str | None
    operation: Callable[..., KeyRecord]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def apply(self, store: KeyStore, facts: ChangeFacts) -> KeyRecord:
        """Blocking: the caller runs it where blocking is allowed (a worker thread, or the CLI itself)."""
        return self.operation(store, *self.args, facts=facts, **self.kwargs)


@dataclass(frozen=True)
class Applied:
    """A change that was made: the record after it and the facts for its audit record and its report."""

    record: KeyRecord
    facts: ChangeFacts


def create(*, registration: bool, label: str = "") -> KeyChange:
    # The id is chosen before the change so that the audit intent written first can name the key it creates.
    key_id = new_key_id()
    return KeyChange(AuditAction.CREATE_KEY, key_id, lifecycle.create_key,
                     kwargs={"registration": registration, "label": label, "key_id": key_id})


def rotate(*, registration: bool, label: str = "") -> KeyChange:
    """The new key (named in advance, like create's) made active, retiring the previous one."""
    key_id = new_key_id()
    return KeyChange(AuditAction.ROTATE_KEY, key_id, lifecycle.rotate,
                     kwargs={"registration": registration, "label": label, "key_id": key_id})


def activate(key_id: str) -> KeyChange:
    return KeyChange(AuditAction.ACTIVATE_KEY, key_id, lifecycle.activate, (key_id,))


def mark_registered(key_id: str) -> KeyChange:
    """The platform has the key: recorded as its activation."""
    return KeyChange(AuditAction.ACTIVATE_KEY, key_id, lifecycle.mark_registered, (key_id,))


def disable(key_id: str, *, force: bool = False) -> KeyChange:
    return KeyChange(AuditAction.DISABLE_KEY, key_id, lifecycle.disable, (key_id,), {"force": force})


def enable(key_id: str) -> KeyChange:
    return KeyChange(AuditAction.ENABLE_KEY, key_id, lifecycle.enable, (key_id,))


def schedule_destruction(key_id: str, days: int) -> KeyChange:
    return KeyChange(AuditAction.SCHEDULE_DESTRUCTION, key_id, lifecycle.schedule_destruction, (key_id,),
                     {"days": days})


def cancel_destruction(key_id: str) -> KeyChange:
    return KeyChange(AuditAction.CANCEL_DESTRUCTION, key_id, lifecycle.cancel_destruction, (key_id,))


def destroy(key_id: str, *, now: datetime | None = None) -> KeyChange:
    return KeyChange(AuditAction.DESTROY_KEY, key_id, lifecycle.destroy, (key_id,), {"now": now} if now else {})

