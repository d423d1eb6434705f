"""The audit event of a decision, built in one place for the server and the command line.

Who acted (`origin`: request id, actor, route, ...) comes from the caller; what was decided is laid out here, so
a record written by `lkm keys disable` and one written by the admin API have the same fields.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lkm.audit.record import INTENT_FIELD, AuditAction, AuditOutcome
from lkm.errors import LkmError


def error_code(error: BaseException, fallback: str = "error") -> str:
    """The stable code of a failure: an LkmError's, or any other error's own `code` (platform_*), else
    `fallback`."""
    if isinstance(error, LkmError):
        return error.code
    code = getattr(error, "code", None)
    return code if isinstance(code, str) and code else fallback


def audit_event(origin: Mapping[str, Any], action: AuditAction, key_id: str | None, *, outcome: str,
                error_code: str | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One audit event; `extra` (the facts of a change, say) goes in last, as it was recorded."""
    event = dict(origin)
    event.update({"action": action, "key_id": key_id, "outcome": outcome})
    if error_code is not None:
        event["error_code"] = error_code
    if extra:
        event.update(extra)
    return event


@dataclass(frozen=True)
class Intent:
    """A change about to be made: its intent record goes first, its outcome record names the same id."""

    action: AuditAction
    key_id: str | None
    extra: Mapping[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def pairing(self) -> dict[str, str]:
        """The field an outcome record written by other means carries to close this intent."""
        return {INTENT_FIELD: self.id}

    def event(self, origin: Mapping[str, Any]) -> dict[str, Any]:
        return audit_event(origin, self.action, self.key_id, outcome=AuditOutcome.INTENT,
                           extra={**self.extra, INTENT_FIELD: self.id})

    def outcome(self, origin: Mapping[str, Any], error: BaseException | None = None, *,
                extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The record of what happened; `key_id` may be None when the change never got to name one."""
        return audit_event(origin, self.action, self.key_id, outcome="ok" if error is None else "error",
                           error_code=None if error is None else error_code(error, fallback=type(error).__name__),
                           extra={**self.extra, **(extra or {}), INTENT_FIELD: self.id})
