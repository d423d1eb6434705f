"""What each authenticated caller may still do: the frozen list, its rate limit, and the volume breaker.

The service asks `check(actor, n)` before `n` unwraps: a caller frozen in mode stop is refused (403
`caller_frozen`), one over its rate (or slowed by the breaker, mode slow) gets 429 `rate_limited` with
Retry-After, and the unwraps are counted for the breaker. A trip with action slow or freeze comes back as a
`Trip`, which `trip()` writes to the frozen list (audited, shared by every process) until an operator runs
`lkm unfreeze`. `refuse_frozen(actor)` alone is what every other request of the native API asks.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from lkm.audit.record import AuditAction
from lkm.auth import Actor, ActorKind
from lkm.breaker import BreakerAction, BreakerSettings, VolumeBreaker
from lkm.config import KeyStoreType, Settings
from lkm.errors import Forbidden, RateLimited
from lkm.events import Intent
from lkm.freeze import FreezeList, FreezeMode, Frozen, FrozenList, caller_ids, freeze_path, new_entry
from lkm.keystore import KeyStore
from lkm.ratelimit import Rate, TokenBuckets, retry_after

log = logging.getLogger("lkm.callerguard")


class GuardObserver(Protocol):
    def throttled(self, caller: str) -> None: ...
    def anomaly(self, caller: str, anomalous: bool) -> None: ...


@dataclass(frozen=True)
class Trip:
    actor: Actor
    mode: FreezeMode


class CallerGuard:
    def __init__(self, frozen: FrozenList, default: Rate, overrides: Mapping[str, Rate] | None = None, *,
                 breaker: BreakerSettings | None = None, observer: GuardObserver | None = None,
                 refresh_seconds: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.frozen = frozen
        self.overrides = dict(overrides or {})
        self.default = default
        self.buckets = TokenBuckets(clock=clock)
        self.breaker_settings = breaker
        self.breaker = VolumeBreaker(breaker, clock=clock) if breaker is not None else None
        self.observer = observer
        self.refresh_seconds = refresh_seconds
        self.clock = clock
        self._next_refresh = 0.0
        self._rates: dict[str, Rate] = {}

    def _rate(self, actor: Actor) -> Rate:
        rate = self._rates.get(actor.name)
        if rate is None:
            rate = next((self.overrides[i] for i in caller_ids(actor) if i in self.overrides), self.default)
            if len(self._rates) < 10_000:
                self._rates[actor.name] = rate
        return rate

    def refuse_frozen(self, actor: Actor) -> Frozen | None:
        """Raises Forbidden (`caller_frozen`) for a caller frozen in mode stop; else its entry (mode slow) or None."""
        now = self.clock()
        if now >= self._next_refresh:
            self._next_refresh = now + self.refresh_seconds
            self.frozen.poll()  # cheap: one stat of the file; nothing for a list the server refreshes
        entry = self.frozen.lookup(actor)
        if entry is not None and entry.mode is FreezeMode.STOP:
            raise Forbidden("this caller is frozen; an operator must unfreeze it", code="caller_frozen")
        return entry

    def check(self, actor: Actor, n: int = 1) -> Trip | None:
        entry = self.refuse_frozen(actor)
        caller = actor.name
        if entry is not None and self.breaker_settings is not None:  # slowed: a small bucket of its own
            slow = self.breaker_settings.slow_per_second
            wait = self.buckets.take(f"{caller}#slow", n, Rate(slow, max(1, int(slow))))
        else:
            wait = self.buckets.take(caller, n, self._rate(actor))
        if wait:
            if self.observer is not None:
                self.observer.throttled(caller)
            raise RateLimited("rate limit exceeded for this caller", retry_after=retry_after(wait))
        if self.breaker is None or self.breaker_settings is None:
            return None
        change = self.breaker.observe(caller, n)
        if change is None:
            return None
        if self.observer is not None:
            self.observer.anomaly(caller, change)
        action = self.breaker_settings.action
        if change:
            log.warning("unwrap volume of %s far above its baseline (%.1f/s); breaker action: %s", caller,
                        self.breaker.baseline(caller), action.value)
        if not change or action is BreakerAction.ALERT or entry is not None:
            return None
        return Trip(actor, FreezeMode.SLOW if action is BreakerAction.SLOW else FreezeMode.STOP)

    async def trip(self, trip: Trip, record: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        """Writes the tripped caller to the frozen list, announced and audited like any change."""
        caller = caller_ids(trip.actor)[0]
        origin = {"request_id": uuid.uuid4().hex, "route": "breaker",
                  "actor": Actor(kind=ActorKind.SYSTEM, name="lkm-breaker").to_audit()}
        intent = Intent(AuditAction.FREEZE_CALLER, None, {"caller": caller, "mode": trip.mode.value, "by": "breaker"})
        error: BaseException | None = None
        try:
            await record(intent.event(origin))
            await asyncio.to_thread(self.frozen.put, new_entry(caller, trip.mode, "breaker", "unwrap volume"))
            await asyncio.to_thread(self.frozen.refresh)
        except Exception as exc:
            error = exc
            log.error("breaker could not freeze %s: %s", caller, exc)
        try:
            await record(intent.outcome(origin, error))
        except Exception as exc:
            log.error("audit write failed: %s", exc)


def frozen_list(settings: Settings, store: KeyStore | None, *, follow: bool = False) -> FrozenList:
    """The frozen callers: the database's table with a PostgreSQL key store (every replica shares it), else the
    file. `follow` (a server): reload the table whenever another process changes it."""
    if settings.keystore.type is KeyStoreType.POSTGRESQL and store is not None:
        from lkm.keystore.postgresql.frozen import ClusterFreezeList  # noqa: PLC0415 - optional extra

        return ClusterFreezeList.of(store, follow=follow)
    return FreezeList(freeze_path(settings))


def guard_for(settings: Settings, observer: GuardObserver | None, store: KeyStore | None = None) -> CallerGuard:
    """A server's guard; with a PostgreSQL `store`, its frozen list follows the database (load it with
    `frozen.refresh()` off the event loop before serving, and again on every refresh tick)."""
    limits = settings.limits
    return CallerGuard(frozen_list(settings, store, follow=True), limits.rate, dict(limits.rate_overrides),
                       breaker=limits.breaker, observer=observer, refresh_seconds=limits.refresh_seconds)
