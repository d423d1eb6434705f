"""The key lifecycle inside the server: admin operations, the rotation schedule, and platform registration.

lkm.lifecycle decides and lkm.changes names each change; this module runs them in the worker pool one at a time
(a server never races itself, whatever the store's own locking), audits each through KeyService.audited, counts
rotations and registrations, and keeps the registration of new keys going in the background: the previous key
stays active until the platform accepts the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from typing import Any

from lkm import changes, lifecycle, registration
from lkm.audit.record import AuditAction
from lkm.auth import Actor, ActorKind
from lkm.config import GenesysSettings, RotationSettings
from lkm.errors import Forbidden
from lkm.events import Intent
from lkm.keys import KeyRecord, KeyState, new_key_id, utcnow
from lkm.lifecycle import ChangeFacts
from lkm.metrics import Metrics
from lkm.roles import Role
from lkm.service import KeyService, RequestContext

log = logging.getLogger("lkm.keyadmin")

SCHEDULE_RETRY_SECONDS = 30.0
SCHEDULE_RETRY_MAX_SECONDS = 3600.0


def system_context(route: str) -> RequestContext:
    """Who acts when nobody asked: the server itself, on its schedule."""
    actor = Actor(kind=ActorKind.SYSTEM, name=f"lkm-server:{socket.gethostname()}:{os.getpid()}",
                  roles=frozenset({Role.ADMIN}))
    return RequestContext(request_id=uuid.uuid4().hex, actor=actor, route=route)


class KeyAdmin:
    def __init__(self, service: KeyService, *, rotation: RotationSettings | None,
                 genesys_settings: GenesysSettings | None, metrics: Metrics | None = None) -> None:
        self.service = service
        self.store = service.store
        self.rotation = rotation
        self.genesys = genesys_settings
        self.metrics = metrics
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._changes = asyncio.Lock()
        self._registrations: dict[str, asyncio.Task[bool]] = {}

    @property
    def registration_required(self) -> bool:
        return self.genesys is not None

    async def apply(self, ctx: RequestContext, change: changes.KeyChange) -> KeyRecord:
        """Makes one change, audited, after any other change of this server has finished."""
        facts = ChangeFacts()
        async with self._changes:
            return await self.service.audited(ctx, change.action, change.key_id, change.apply, self.store, facts,
                                              facts=facts)

    # --- the operations ------------------------------------------------------------------------------------

    async def create(self, ctx: RequestContext, *, label: str = "") -> KeyRecord:
        record = await self.apply(ctx, changes.create(registration=self.registration_required, label=label))
        self._register_if_pending(record)
        return record

    async def rotate(self, ctx: RequestContext, *, label: str = "") -> KeyRecord:
        try:
            record = await self.apply(ctx, changes.rotate(registration=self.registration_required, label=label))
        except Forbidden:
            raise  # a caller without the admin role is no failed rotation (alerts watch that counter)
        except Exception:
            self._rotation_done(False)
            raise
        self._rotation_done(True)
        self._register_if_pending(record)
        return record

    async def activate(self, ctx: RequestContext, key_id: str) -> KeyRecord:
        return await self.apply(ctx, changes.activate(key_id))

    async def disable(self, ctx: RequestContext, key_id: str, *, force: bool = False) -> KeyRecord:
        return await self.apply(ctx, changes.disable(key_id, force=force))

    async def enable(self, ctx: RequestContext, key_id: str) -> KeyRecord:
        record = await self.apply(ctx, changes.enable(key_id))
        self._register_if_pending(record)  # a pending key disabled mid-registration resumes registering
        return record

    async def schedule_destruction(self, ctx: RequestContext, key_id: str, days: int) -> KeyRecord:
        return await self.apply(ctx, changes.schedule_destruction(key_id, days))

    async def cancel_destruction(self, ctx: RequestContext, key_id: str) -> KeyRecord:
        return await self.apply(ctx, changes.cancel_destruction(key_id))

    # --- the schedule --------------------------------------------------------------------------------------

    async def rotate_if_due(self) -> KeyRecord | None:
        """One look at the schedule; rotates (audited, counted) only when due and no other process beat us."""
        assert self.rotation is not None
        every = self.rotation.every_seconds
        now = utcnow()
        due = lifecycle.next_rotation_due(self.store.list_keys(), every)
        if self.metrics is not None:
            self.metrics.set_rotation_schedule(every, (due or now).timestamp())
        if due is not None and due > now:
            return None
        ctx = system_context("scheduler")
        facts = ChangeFacts()
        started = time.perf_counter()
        key_id = new_key_id()
        intent = Intent(AuditAction.ROTATE_KEY, key_id, {"scheduled": True})
        # Announced before the change (a failed write stops it here; the loop retries later).
        await self.service.audit_decision(ctx, AuditAction.ROTATE_KEY, key_id=key_id, error=None, started=started,
                                          intent=intent)
        call = functools.partial(lifecycle.rotate_if_due, self.store, every, key_id=key_id,
                                 registration=self.registration_required, now=now, facts=facts)
        try:
            async with self._changes:
                record = await self.service.run(call)
        except Exception as exc:
            self._rotation_done(False)
            await self._audit(ctx, AuditAction.ROTATE_KEY, key_id, exc, started=started,
                              details={**facts.audit_details(), **intent.pairing()})
            raise
        if record is None:
            # Another server sharing the store rotated for this period: the announced change was not made.
            await self._audit(ctx, AuditAction.ROTATE_KEY, None, None, started=started,
                              details={"unchanged": True, **intent.pairing()})
            return None
        self._rotation_done(True)
        await self._audit(ctx, AuditAction.ROTATE_KEY, record.id, None, started=started,
                          details={**facts.audit_details(), **intent.pairing()})
        log.info("scheduled rotation: new key %s (%s)", record.id, record.state.value)
        self._register_if_pending(record)
        return record

    async def schedule_loop(self, interval: float) -> None:
        """Looks every `interval` seconds; a missed rotation (server down when due) happens at the first look."""
        failures = 0
        while True:
            delay = interval
            try:
                await self.rotate_if_due()
                failures = 0
            except Exception as exc:
                failures += 1
                delay = min(SCHEDULE_RETRY_SECONDS * 2 ** (failures - 1), SCHEDULE_RETRY_MAX_SECONDS)
                log.error("scheduled rotation failed (next try in %.0f s): %s", delay, exc)
            await asyncio.sleep(delay)

    # --- registration --------------------------------------------------------------------------------------

    def _register_if_pending(self, record: KeyRecord) -> None:
        if self.genesys is not None and record.state is KeyState.PENDING_ACTIVATION:
            self.start_registration(record.id)

    def start_registration(self, key_id: str) -> asyncio.Task[bool]:
        task = self._registrations.get(key_id)
        if task is None or task.done():
            task = asyncio.create_task(self._register_logged(key_id), name=f"lkm-register-{key_id}")
            self._registrations[key_id] = task
        return task

    async def _register_logged(self, key_id: str) -> bool:
        try:
            return await self.register(key_id)
        except Exception:
            log.exception("registering key %s failed; it stays pending activation", key_id)
            return False

    def resume_registrations(self) -> None:
        """At start: keys left pending (registration failed, or the server stopped mid-way) get another run."""
        for record in self.store.list_keys():
            self._register_if_pending(record)

    async def register(self, key_id: str) -> bool:
        """Registers one key (retrying with backoff) and activates it; False when it stays pending."""
        assert self.genesys is not None
        ctx = system_context("registration")

        async def attempted(attempt: registration.Attempt) -> None:
            if self.metrics is not None:
                self.metrics.registration_done(attempt.error is None)
            await self._audit(ctx, AuditAction.REGISTER_KEY, key_id, attempt.error, started=time.perf_counter(),
                              details=attempt.audit_details())

        outcome = await registration.register(self.store, self.genesys, key_id, self.owner, run=self.service.run,
                                              on_attempt=attempted,
                                              apply=functools.partial(self.apply, ctx))
        if outcome.holder is not None:
            log.info("key %s is being registered by another process; not registering it here", key_id)
        elif outcome.error is not None:
            log.error("key %s stays pending activation; key %s stays active: %s", key_id, outcome.active,
                      outcome.error)
        return outcome.activated is not None

    async def close(self) -> None:
        tasks = [t for t in self._registrations.values() if not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # --- helpers -------------------------------------------------------------------------------------------

    def _rotation_done(self, ok: bool) -> None:
        if self.metrics is not None:
            self.metrics.rotation_done(ok)

    async def _audit(self, ctx: RequestContext, action: AuditAction, key_id: str | None, error: BaseException | None,
                     *, started: float, details: dict[str, Any]) -> None:
        """For work the server does on its own: a failed audit write is logged, it cannot fail a caller."""
        await self.service.audit_decision(ctx, action, key_id=key_id, error=error, started=started, extra=details,
                                          fail_closed=False)
