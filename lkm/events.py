"""The audit event of a decision, built in one place for the server and the command line.

Who acted (`origin`: request id, actor, route, ...) comes from the caller; what was decided is laid out here, so
a record written by `lkm keys disable` and one written by the admin API have the same fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lkm.errors import LkmError


def error_code(error: BaseException, fallback: str = "error") -> str:
    """The stable code of a failure: an LkmError's, or any other error's own `code` (platform_*), else
    `fallback`."""
    if isinstance(error, LkmError):
        return error.code
    code = getattr(error, "code", None)
    return code if isinstance(code, str) and code else fallback


def audit_event(origin: Mapping[str, Any], action: str, key_id: str | None, *, outcome: str,
                error_code: str | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One audit event; `extra` (the facts of a change, say) goes in last, as it was recorded."""
    event = dict(origin)
    event.update({"action": action, "key_id": key_id, "outcome": outcome})
    if error_code is not None:
        event["error_code"] = error_code
    if extra:
        event.update(extra)
    return event
