"""How well a key store can serve, beyond "it can" / "it cannot".

A store with a remote database keeps serving unwraps from what it holds while the database is away; readiness
must then stay green (playback goes on) while saying that changes cannot be made. `check()` keeps its meaning
(raise when the store cannot serve at all); `health()` adds the degraded middle for stores that have one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class StoreStatus(enum.StrEnum):
    OK = "ok"
    DEGRADED = "degraded"  # serves unwraps with the keys it holds; cannot change or learn keys


@dataclass(frozen=True)
class StoreHealth:
    status: StoreStatus
    detail: str = ""  # for logs and /readyz; never holds secrets (no DSN, no key material)
    since: float | None = None  # time.time() when the current status began


@runtime_checkable
class ReportsHealth(Protocol):
    def health(self) -> StoreHealth: ...
