"""The safeguards of destruction, judged on a stored record and a moment; and when a key last unwrapped.

Reading only: `lkm.lifecycle.destroy` acts on this verdict inside the store's lock, `lkm keys destroy --dry-run`
shows it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from lkm.keys import KeyRecord, KeyState, format_time, parse_time, utcnow
from lkm.keystore import KeyStore

DEFAULT_DESTRUCTION_DAYS = 30
MIN_DESTRUCTION_DAYS = 7
MAX_DESTRUCTION_DAYS = 3650

# Keys of KeyRecord.extra that the lifecycle owns and the safeguards read.
DISABLED_AT = "disabled_at"
DESTRUCTION_SCHEDULED_AT = "destruction_scheduled_at"


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
    """All four safeguards of destruction, each judged on the stored record and the clock at this moment."""
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
