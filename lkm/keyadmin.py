"""The key lifecycle inside the server: admin operations, the rotation schedule, and platform registration.

lkm.lifecycle decides; this module runs its blocking operations in the worker pool one at a time (a server
never races itself, whatever the store's own locking), audits each through KeyService.audited, counts
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
from collections.abc import Callable
from typing import Any

from lkm import genesys, lifecycle
from lkm.auth import Actor
from lkm.config import GenesysSettings, RotationSettings
from lkm.errors import Forbidden
from lkm.keys import KeyRecord, KeyState, utcnow
from lkm.metrics import Metrics
from lkm.roles import Role
from lkm.service import KeyService, RequestContext

log = logging.getLogger("lkm.keyadmin")

SCHEDULE_RETRY_SECONDS = 30.0
SCHEDULE_RETRY_MAX_SECONDS = 3600.0


def system_context(route: str) -> RequestContext:
    """Who acts when nobody asked: the server itself, on its schedule."""
    actor = Actor(kind="system", name=f"lkm-server:{socket.gethostname()}:{os.getpid()}",
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

    async def _change(self, ctx: RequestContext, action: str, key_id: str | None,
                      func: Callable[..., KeyRecord], *args: Any, **kwargs: Any) -> KeyRecord:
        details: dict[str, Any] = {}
        call = functools.partial(func, self.store, *args, details=details, **kwargs)
        async with self._changes:
            return await self.service.audited(ctx, action, key_id, call, details=details)

    # --- the operations ------------------------------------------------------------------------------------

    async def create(self, ctx: RequestContext, *, label: str = "") -> KeyRecord:
        record = await self._change(ctx, "create_key", None, lifecycle.create_key,
                                    registration=self.registration_required, label=label)
        self._register_if_pending(record)
        return record

    async def rotate(self, ctx: RequestContext, *, label: str = "") -> KeyRecord:
        try:
            record = await self._change(ctx, "rotate_key", None, lifecycle.rotate,
                                        registration=self.registration_required, label=label)
        except Forbidden:
            raise  # a caller without the admin role is no failed rotation (alerts watch that counter)
        except Exception:
            self._rotation_done(False)
            raise
        self._rotation_done(True)
        self._register_if_pending(record)
        return record

    async def activate(self, ctx: RequestContext, key_id: str) -> KeyRecord:
        return await self._change(ctx, "activate_key", key_id, lifecycle.activate, key_id)

    async def disable(self, ctx: RequestContext, key_id: str, *, force: bool = False) -> KeyRecord:
        return await self._change(ctx, "disable_key", key_id, lifecycle.disable, key_id, force=force)

    async def enable(self, ctx: RequestContext, key_id: str) -> KeyRecord:
        record = await self._change(ctx, "enable_key", key_id, lifecycle.enable, key_id)
        self._register_if_pending(record)  # a pending key disabled mid-registration resumes registering
        return record

    async def schedule_destruction(self, ctx: RequestContext, key_id: str, days: int) -> KeyRecord:
        return await self._change(ctx, "schedule_destruction", key_id, lifecycle.schedule_destruction, key_id,
                                  days=days)

    async def cancel_destruction(self, ctx: RequestContext, key_id: str) -> KeyRecord:
        return await self._change(ctx, "cancel_destruction", key_id, lifecycle.cancel_destruction, key_id)

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
        details: dict[str, Any] = {}
        started = time.perf_counter()
        call = functools.partial(lifecycle.rotate_if_due, self.store, every,
                                 registration=self.registration_required, now=now, details=details)
        try:
            async with self._changes:
                record = await self.service.run(call)
        except Exception as exc:
            self._rotation_done(False)
            await self._audit(ctx, "rotate_key", None, exc, started=started, details=details)
            raise
        if record is None:
            return None  # another server sharing the store rotated for this period
        self._rotation_done(True)
        await self._audit(ctx, "rotate_key", record.id, None, started=started, details=details)
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
        settings = self.genesys
        ctx = system_context("registration")
        claimed = await self.service.run(functools.partial(
            lifecycle.claim_registration, self.store, key_id, self.owner,
            genesys.registration_lease_seconds(settings)))
        if not claimed:
            log.info("key %s is being registered by another process; not registering it here", key_id)
            return False
        record = await self.service.run(self.store.get_key, key_id)

        async def attempted(attempt: int, error: genesys.RegistrationError | None) -> None:
            if self.metrics is not None:
                self.metrics.registration_done(error is None)
            details: dict[str, Any] = {"attempt": attempt, "max_attempts": settings.max_attempts}
            if error is not None:
                details.update(error_message=str(error), retrying=error.retryable and attempt < settings.max_attempts)
            await self._audit(ctx, "register_key", key_id, error, started=time.perf_counter(), details=details)

        try:
            await genesys.register_key(settings, record, on_attempt=attempted)
        except genesys.RegistrationError as exc:
            log.error("key %s stays pending activation; key %s stays active: %s", key_id,
                      ",".join(k.id for k in lifecycle.active_keys(self.store)) or "(none)", exc)
            with contextlib.suppress(Exception):
                await self.service.run(lifecycle.release_registration, self.store, key_id, self.owner)
            return False
        await self._change(ctx, "activate_key", key_id, lifecycle.mark_registered, key_id)
        return True

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

    async def _audit(self, ctx: RequestContext, action: str, key_id: str | None, error: BaseException | None,
                     *, started: float, details: dict[str, Any]) -> None:
        """For work the server does on its own: a failed audit write is logged, it cannot fail a caller.

        A registration error is no LkmError but has its own stable code (platform_*): that code is recorded."""
        extra = dict(details)
        code = getattr(error, "code", None)
        if code:
            extra.setdefault("error_code", code)
        await self.service._audit(ctx, action, key_id=key_id, error=error, started=started, extra=extra,
                                  fail_closed=False)
