"""Frozen callers: identities an operator (`lkm freeze ID`) or the unwrap-volume breaker stopped or slowed.

An entry maps an id (a Hawk id or a client-certificate rule's name) to how it is frozen. Where the list lives
(`FrozenList`, the interface both keep):
- `FreezeList`: one small JSON file that every process of a server (and, on a shared directory, every replica)
  reads: `frozen.json` in the file key store's directory, else beside the audit log. Writers replace it
  atomically under a lock file; readers pick up a change within `limits.refresh_seconds` (one stat per refresh,
  never a read per request).
- with the PostgreSQL key store, the `lkm_frozen_callers` table of its database
  (lkm.keystore.postgresql.frozen.ClusterFreezeList), so every replica on the database shares one list.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from lkm import fsutil
from lkm.auth import Actor
from lkm.config import KeyStoreType, Settings

log = logging.getLogger("lkm.freeze")

FILE_NAME = "frozen.json"
FORMAT = "lkm-frozen-callers"


class FreezeMode(StrEnum):
    STOP = "stop"  # every request refused: 403 caller_frozen
    SLOW = "slow"  # unwraps throttled to limits.breaker.slow_per_second: 429 rate_limited


@dataclass(frozen=True)
class Frozen:
    id: str
    mode: FreezeMode
    by: str  # "operator" (lkm freeze) or "breaker"
    at: float
    reason: str = ""

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "mode": self.mode.value, "by": self.by, "at": self.at, "reason": self.reason}


def freeze_path(settings: Settings) -> Path:
    if settings.keystore.type is KeyStoreType.FILE and settings.keystore.path is not None:
        return settings.keystore.path / FILE_NAME
    return settings.audit.path.parent / FILE_NAME


def caller_ids(actor: Actor) -> tuple[str, ...]:
    """The ids an operator may freeze this caller by: its Hawk id, or each client rule it matched."""
    if actor.hawk_id is not None:
        return (actor.hawk_id,)
    return tuple(actor.name.split("+"))


class FrozenList(Protocol):
    """The frozen callers as a server and the CLI use them, wherever they are kept."""

    def poll(self) -> bool:
        """Cheap enough for the event loop (the guard calls it every refresh_seconds): True when the list changed."""
        ...

    def refresh(self) -> bool:
        """Blocking: reads the list again (off the event loop); True when it changed. Trouble keeps the last list."""
        ...

    def lookup(self, actor: Actor) -> Frozen | None: ...

    @property
    def entries(self) -> Mapping[str, Frozen]: ...

    def read(self) -> dict[str, Frozen]: ...

    def put(self, entry: Frozen) -> bool:
        """Adds or replaces an entry; False when the same id was already frozen in the same mode."""
        ...

    def remove(self, caller: str) -> bool:
        """False when the caller was not frozen."""
        ...


class HeldList:
    """What every kind of list shares: the entries held in memory, which requests look up (never a read)."""

    def __init__(self) -> None:
        self._entries: dict[str, Frozen] = {}

    def lookup(self, actor: Actor) -> Frozen | None:
        entries = self._entries
        if not entries:
            return None
        for caller in caller_ids(actor):
            entry = entries.get(caller)
            if entry is not None:
                return entry
        return None

    @property
    def entries(self) -> Mapping[str, Frozen]:
        return self._entries

    def _replace(self, entries: dict[str, Frozen]) -> bool:
        """Holds `entries` from now on (one reference swapped: a reader sees the old list or the new one);
        True when they differ from the ones held."""
        changed = entries != self._entries
        self._entries = entries
        return changed


class FreezeList(HeldList):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._seen: tuple[int, int] | None = None

    # --- reading (servers) ----------------------------------------------------------------------------------

    def poll(self) -> bool:
        """One stat: the file is read only when it changed."""
        return self.refresh()

    def refresh(self) -> bool:
        """Reads the file again if it changed; True when the list changed. A damaged file keeps the last list."""
        try:
            stat = self.path.stat()
            seen: tuple[int, int] | None = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            seen = None
        if seen == self._seen:
            return False
        try:
            entries = self.read()
        except (OSError, ValueError, KeyError) as exc:
            log.error("frozen callers file %s unreadable; keeping the last list: %s", self.path, exc)
            return False
        self._seen = seen
        return self._replace(entries)

    def read(self) -> dict[str, Frozen]:
        try:
            doc = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return {}
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError("not a frozen-callers file")
        return {e["id"]: Frozen(id=e["id"], mode=FreezeMode(e["mode"]), by=e["by"], at=float(e["at"]),
                                reason=e.get("reason", "")) for e in doc["callers"]}

    # --- writing (CLI, breaker) -----------------------------------------------------------------------------

    def put(self, entry: Frozen) -> bool:
        """Adds or replaces an entry; False when the same id was already frozen in the same mode."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with fsutil.file_lock(self.path.with_name(FILE_NAME + ".lock")):
            entries = self.read()
            old = entries.get(entry.id)
            if old is not None and old.mode is entry.mode:
                return False
            entries[entry.id] = entry
            self._write(entries)
        return True

    def remove(self, caller: str) -> bool:
        with fsutil.file_lock(self.path.with_name(FILE_NAME + ".lock")):
            entries = self.read()
            if entries.pop(caller, None) is None:
                return False
            self._write(entries)
        return True

    def _write(self, entries: Mapping[str, Frozen]) -> None:
        doc = {"format": FORMAT, "callers": [e.to_json() for _, e in sorted(entries.items())]}
        fsutil.atomic_write(self.path, json.dumps(doc, indent=1).encode())


def new_entry(caller: str, mode: FreezeMode, by: str, reason: str = "") -> Frozen:
    return Frozen(id=caller, mode=mode, by=by, at=time.time(), reason=reason)
