"""The use cases: authorize, run key-store work off the event loop, audit, count.

Free of HTTP: routes turn wire formats into these calls and LkmErrors back into wire errors.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from lkm.admission import Admission, is_shed
from lkm.audit.record import AuditAction
from lkm.auth import Actor
from lkm.callerguard import CallerGuard
from lkm.errors import (
    InternalError,
    InvalidRequest,
    KeyStoreError,
    LkmError,
    Unavailable,
)
from lkm.events import Intent, audit_event, error_code
from lkm.keys import CIPHERTEXT_BYTES, Algorithm, KeyRecord
from lkm.keystore import (  # noqa: F401 - some re-exported
    UNWRAPPABLE_STATES,
    KeyStore,
    StartsDecrypts,
    SyntheticAnswers,
    key_unusable,
    usable_record,
)
from lkm.lifecycle import ChangeFacts
from lkm.outcomes import KEY_KNOWN_OUTCOMES, unwrap_outcome
from lkm.roles import Role
from lkm.workers import WorkerThreads

log = logging.getLogger("lkm.service")
T = TypeVar("T")


class AuditSink(Protocol):
    async def record(self, event: dict[str, Any]) -> None: ...


class UnwrapObserver(Protocol):
    def unwrap_done(self, route: str, key_id: str | None, outcome: str, seconds: float) -> None: ...
    def keystore_op(self, backend: str, operation: str, seconds: float) -> None: ...


@dataclass(frozen=True)
class RequestContext:
    request_id: str
    actor: Actor
    client: str | None = None
    platform_user_id: str | None = None
    route: str = "native"

    def audit_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"request_id": self.request_id, "actor": self.actor.to_audit(),
                                  "route": self.route}
        if self.client:
            fields["client"] = self.client
        if self.platform_user_id:
            fields["platform_user_id"] = self.platform_user_id
        return fields


@dataclass(frozen=True)
class UnwrapItem:
    """One item of a batch unwrap, already decoded from the wire."""

    key_id: str
    ciphertext: bytes
    algorithm: Algorithm


class DenialLimiter:
    """Bounds the audit records that refused callers can cause, per caller (see `caller_key`).

    Callers must not be able to fill the disk (or, with pruning, push real records out) by sending garbage or
    asking for what they may not do. Each caller gets a burst of `burst` records, refilled at `per_second`; what
    it sends beyond that is counted and the count goes into its next written record (`suppressed_denials`).
    Metrics still count every failure. Callers are tracked in a bounded LRU.
    """

    def __init__(self, *, burst: int = 20, per_second: float = 2.0, clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.per_second = per_second
        self.clients = clients
        self.clock = clock
        self._state: OrderedDict[str, tuple[float, float, int]] = OrderedDict()  # tokens, last, suppressed

    def admit(self, client: str | None) -> int | None:
        """None: suppress this record. Otherwise the number suppressed since the client's last record."""
        key = client or "-"
        now = self.clock()
        tokens, last, suppressed = self._state.pop(key, (float(self.burst), now, 0))
        tokens = min(float(self.burst), tokens + (now - last) * self.per_second)
        if tokens < 1.0:
            self._state[key] = (tokens, now, suppressed + 1)
            result = None
        else:
            self._state[key] = (tokens - 1.0, now, 0)
            result = suppressed
        if len(self._state) > self.clients:
            self._state.popitem(last=False)
        return result


def caller_key(ctx: RequestContext) -> str:
    """Whose budget of refusal records a request spends: an authenticated identity's own (wherever it calls from),
    else its client address (a failed authentication proves no identity)."""
    return f"id:{ctx.actor.kind}:{ctx.actor.name}" if ctx.actor.roles else f"addr:{ctx.client or '-'}"


def is_refusal(error: BaseException | None) -> bool:
    """A caller's mistake or missing right (4xx): bounded per caller. Failures of the server are never bounded."""
    return isinstance(error, LkmError) and 400 <= error.status < 500


def batch_summary(items: Sequence[UnwrapItem | LkmError], results: Sequence[bytes | LkmError]) -> dict[str, Any]:
    """The one audit record of a batch: how many items, which keys unwrapped how often, which errors how often."""
    keys: dict[str, int] = {}
    errors: dict[str, int] = {}
    for item, result in zip(items, results, strict=True):
        if isinstance(result, LkmError):
            errors[result.code] = errors.get(result.code, 0) + 1
        elif not isinstance(item, LkmError):
            keys[item.key_id] = keys.get(item.key_id, 0) + 1
    summary: dict[str, Any] = {"items": len(items), "ok": sum(keys.values()), "key_ids": keys}
    if errors:
        summary["errors"] = errors
    return summary


class KeyService:
    def __init__(self, store: KeyStore, audit: AuditSink, executor: Executor, *,
                 observer: UnwrapObserver | None = None, fail_closed: bool = True,
                 admission: Admission | None = None, pkcs1_length: int | None = None,
                 guard: CallerGuard | None = None) -> None:
        """`pkcs1_length`: RSA-PKCS1-V1_5 unwraps answer exactly this many bytes (see `constant_length`)."""
        self.store = store
        self.pkcs1_length = pkcs1_length
        self.guard = guard
        self.audit = audit
        self.executor = executor
        self.observer = observer
        self.fail_closed = fail_closed
        self.admission = admission
        self.denials = DenialLimiter()
        # A store whose operation runs in other processes is awaited on the loop when there are worker threads
        # to hand it to otherwise (not when the operations run inline, on the loop, by configuration).
        self.awaited: tuple[StartsDecrypts, WorkerThreads] | None = None
        if isinstance(store, StartsDecrypts) and admission is not None and admission.pool is not None:
            self.awaited = (store, admission.pool)

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """Runs blocking key-store work in the worker pool, translating backend trouble to 503."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(in_store, func, *args))

    async def audit_decision(self, ctx: RequestContext, action: AuditAction, *, key_id: str | None,
                             error: BaseException | None, started: float, extra: dict[str, Any] | None = None,
                             fail_closed: bool = True, intent: Intent | None = None, bounded: bool = True,
                             code: str | None = None) -> None:
        """Writes the record of one decision (with `intent`: the announcement of a change about to be made);
        unless `fail_closed` is off, a failed write refuses the act. A refusal (4xx) is `bounded` per caller
        like every denial: a flood of them writes a burst, then a trickle that counts what it left out."""
        if isinstance(error, LkmError):
            error.audited = True
        if bounded and intent is None and is_refusal(error):
            written, extra = self._bounded(ctx, extra)
            if not written:
                return
        origin = ctx.audit_fields()  # a fresh dict: completed here, not copied
        origin["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
        if intent is not None:
            event = intent.event(origin)
        else:
            event = audit_event(origin, action, key_id, outcome="ok" if error is None else "error",
                                error_code=code or (None if error is None else error_code(error)),
                                extra=extra)
        await self._record(event, fail_closed=self.fail_closed and fail_closed)

    async def audit_denial(self, ctx: RequestContext, action: AuditAction, error: LkmError,
                           key_id: str | None = None) -> None:
        """Refusals are decisions too. Failing to record one is logged; the caller is refused either way."""
        if error.audited:
            return
        error.audited = True
        written, extra = self._bounded(ctx, None)
        if written:
            await self._record(audit_event(ctx.audit_fields(), action, key_id, outcome="denied",
                                           error_code=error.code, extra=extra), fail_closed=False)

    def _bounded(self, ctx: RequestContext, extra: dict[str, Any] | None) -> tuple[bool, dict[str, Any] | None]:
        """Whether a refusal's record is written (a caller's flood of them is bounded), and its extra fields with
        the count of the refusals left out since the caller's last record."""
        suppressed = self.denials.admit(caller_key(ctx))
        if suppressed is None:
            return False, extra
        return True, {**(extra or {}), "suppressed_denials": suppressed} if suppressed else extra

    async def _record(self, event: dict[str, Any], *, fail_closed: bool) -> None:
        """Writes `event`; a failed write is logged and, when `fail_closed`, refuses the act."""
        try:
            await self.audit.record(event)
        except Exception as exc:
            log.error("audit write failed: %s", exc)
            if fail_closed:
                raise Unavailable("audit trail unavailable; refusing to act unaudited",
                                  code="audit_unavailable") from None

    # --- unwrap --------------------------------------------------------------------------------------------

    async def admit_unwraps(self, ctx: RequestContext, count: int) -> None:
        """Frozen, rate limit, volume breaker (lkm.callerguard): raises Forbidden or RateLimited."""
        if self.guard is not None:
            trip = self.guard.check(ctx.actor, count)
            if trip is not None:
                await self.guard.trip(trip, self.audit.record)

    def _unwrap_sync(self, key_id: str, ciphertext: bytes, algorithm: Algorithm) -> bytes:
        """On a worker: one unwrap, with key-store trouble already translated to 503, whoever the caller."""
        return in_store(self._unwrap_in_store, key_id, ciphertext, algorithm)

    def _unwrap_in_store(self, key_id: str, ciphertext: bytes, algorithm: Algorithm) -> bytes:
        record = usable_record(self.store, key_id, algorithm)
        started = time.perf_counter()
        try:
            plaintext = self.store.decrypt(key_id, ciphertext, algorithm)
            if algorithm is Algorithm.RSA_PKCS1_V1_5 and self.pkcs1_length is not None:
                return constant_length(self.store, record.id, ciphertext, plaintext, self.pkcs1_length)
            return plaintext
        finally:
            if self.observer:
                self.observer.keystore_op(self.store.backend, "decrypt", time.perf_counter() - started)

    async def _unwrap_awaited(self, store: StartsDecrypts, threads: WorkerThreads, key_id: str, ciphertext: bytes,
                              algorithm: Algorithm) -> bytes:
        """One unwrap by a StartsDecrypts store, awaited on the loop; on a worker thread when it cannot start at
        once (see start_decrypt)."""
        started = time.perf_counter()
        answer = store.start_decrypt(key_id, ciphertext, algorithm, UNWRAPPABLE_STATES)
        if answer is None:
            return await threads.run(self._unwrap_sync, key_id, ciphertext, algorithm)
        try:
            return await answer
        except KeyStoreError as exc:
            raise keystore_unavailable(exc) from None
        finally:
            if self.observer:
                self.observer.keystore_op(self.store.backend, "decrypt", time.perf_counter() - started)

    async def unwrap(self, ctx: RequestContext, key_id: str, ciphertext: bytes, algorithm: Algorithm) -> bytes:
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            ctx.actor.require(Role.UNWRAP)
            await self.admit_unwraps(ctx, 1)
            if len(ciphertext) != CIPHERTEXT_BYTES:
                raise _bad_length(len(ciphertext))
            if self.admission is None:
                return await self.run(self._unwrap_in_store, key_id, ciphertext, algorithm)  # run() translates
            if self.awaited is not None:
                return await self.admission.run_awaited(
                    ctx.route, started, 1,
                    functools.partial(self._unwrap_awaited, *self.awaited, key_id, ciphertext, algorithm))
            return await self.admission.run(ctx.route, started, 1, self._unwrap_sync, key_id, ciphertext,
                                            algorithm)
        except BaseException as exc:
            error = exc
            raise
        finally:
            await self._finish_unwrap(ctx, key_id, algorithm, error, started)

    def _observe_unwrap(self, ctx: RequestContext, key_id: str | None, error: BaseException | None,
                        started: float) -> None:
        if self.observer:
            outcome = unwrap_outcome(error)
            self.observer.unwrap_done(ctx.route, key_id if outcome in KEY_KNOWN_OUTCOMES else None, outcome,
                                      time.perf_counter() - started)

    async def _finish_unwrap(self, ctx: RequestContext, key_id: str, algorithm: Algorithm,
                             error: BaseException | None, started: float) -> None:
        if isinstance(error, asyncio.CancelledError):
            return
        self._observe_unwrap(ctx, key_id, error, started)
        if is_shed(error):
            # A refusal for overload touches no key and is counted (lkm_requests_shed_total); auditing it would
            # add an fsync'd record exactly when the server has no time to spare.
            return
        # The response waits for its record to be durable: no unaudited unwrap leaves the server.
        await self.audit_decision(ctx, AuditAction.UNWRAP, key_id=key_id, error=error, started=started,
                                  extra={"algorithm": algorithm.value})

    async def unwrap_batch(self, ctx: RequestContext, items: Sequence[UnwrapItem | LkmError]) -> list[bytes | LkmError]:
        """Unwraps each item independently, in order: an item's problem becomes its result, never the batch's.

        The private-key work is split into one chunk per worker, so a batch uses every core and pays the
        request overhead (TLS, authentication, parsing) once. Each item gets its own audit record; they share
        one record for the whole batch, with counts (bounded like any refusal when no item succeeded). Only a
        missing role, an overload refusal or an audit failure fail the whole request.
        """
        started = time.perf_counter()
        ctx = replace(ctx, route="batch")
        ctx.actor.require(Role.UNWRAP)
        try:
            await self.admit_unwraps(ctx, len(items))
        except LkmError as exc:  # frozen or over its rate: audited (bounded) like a refused single unwrap
            await self.audit_decision(ctx, AuditAction.UNWRAP, key_id=None, error=exc, started=started,
                                      extra={"items": len(items)})
            raise
        results: list[bytes | LkmError] = []
        todo: list[tuple[int, UnwrapItem]] = []
        for i, item in enumerate(items):
            if isinstance(item, LkmError):
                results.append(item)
            elif len(item.ciphertext) != CIPHERTEXT_BYTES:
                results.append(_bad_length(len(item.ciphertext)))
            else:
                results.append(b"")
                todo.append((i, item))
        workers = self.admission.workers if self.admission is not None else 1
        chunks = [todo[n::workers] for n in range(min(workers, len(todo)))]

        def job(chunk: list[tuple[int, UnwrapItem]]) -> list[bytes | LkmError]:
            out: list[bytes | LkmError] = []
            for _, item in chunk:
                try:
                    out.append(self._unwrap_sync(item.key_id, item.ciphertext, item.algorithm))
                except LkmError as exc:
                    out.append(exc)
            return out

        if self.admission is not None:
            done = await self.admission.run_chunks(ctx.route, started,
                                                   [(len(c), functools.partial(job, c)) for c in chunks])
        else:
            done = list(await asyncio.gather(*(self.run(job, c) for c in chunks)))
        for chunk, outcome in zip(chunks, done, strict=True):
            # A chunk that could not start in time comes back as one error for all of its items.
            per_item = outcome if isinstance(outcome, list) else [outcome] * len(chunk)
            for (i, _), result in zip(chunk, per_item, strict=True):
                results[i] = result
        for item, result in zip(items, results, strict=True):
            self._observe_unwrap(ctx, None if isinstance(item, LkmError) else item.key_id,
                                 result if isinstance(result, LkmError) else None, started)
        if all(isinstance(r, LkmError) and is_shed(r) for r in results):
            return results  # nothing was tried: counted as shed, like a refused single unwrap
        summary = batch_summary(items, results)
        failed = None if summary["ok"] else next(r for r in results if isinstance(r, LkmError))
        await self.audit_decision(ctx, AuditAction.UNWRAP, key_id=None, error=failed, started=started, extra=summary,
                                  code="batch_failed" if failed is not None else None)
        return results

    # --- reading keys --------------------------------------------------------------------------------------

    async def list_keys(self, ctx: RequestContext) -> list[KeyRecord]:
        ctx.actor.require(Role.READ)
        return await self.run(self.store.list_keys)

    async def get_key(self, ctx: RequestContext, key_id: str) -> KeyRecord:
        ctx.actor.require(Role.READ)
        return await self.run(self.store.get_key, key_id)

    # --- changing keys -------------------------------------------------------------------------------------

    async def audited(self, ctx: RequestContext, action: AuditAction, key_id: str | None,
                      func: Callable[..., T], *args: Any, facts: ChangeFacts | None = None) -> T:
        """Runs a key change off the loop and audits it, success or failure.

        `facts` may be filled by `func` while it runs (states before and after, say): what it holds when
        `func` returns or fails goes into the audit record, so a refused change records what was refused.
        """
        started = time.perf_counter()
        error: BaseException | None = None
        result: T | None = None
        intent: Intent | None = None
        try:
            ctx.actor.require(Role.ADMIN)
            # Announced durably before it is made: a crash in between leaves an intent, never an unrecorded change.
            intent = Intent(action, key_id)
            await self.audit_decision(ctx, action, key_id=key_id, error=None, started=started, intent=intent)
            result = await self.run(func, *args)
            if key_id is None and isinstance(result, KeyRecord):
                key_id = result.id
            return result
        except BaseException as exc:
            error = exc
            raise
        finally:
            if not isinstance(error, asyncio.CancelledError):
                # Fail closed before acting is the unwrap rule; a change that already happened is reported as
                # done even if its record cannot be written (logged and counted), so that a retry does not
                # rotate or create twice.
                await self.audit_decision(ctx, action, key_id=key_id, error=error, started=started,
                                          extra={**(facts.audit_details() if facts else {}),
                                                 **(intent.pairing() if intent else {})},
                                          fail_closed=error is not None, bounded=intent is None)

def constant_length(store: KeyStore, key_id: str, ciphertext: bytes, plaintext: bytes, length: int) -> bytes:
    """A PKCS#1 v1.5 answer of `length` bytes whatever the padding held: the store's synthetic value whenever
    the plaintext (real, or the synthetic one of OpenSSL's implicit rejection) has another length, so its length
    tells a caller nothing. The synthetic value is computed every time, so both branches cost the same."""
    if not isinstance(store, SyntheticAnswers):
        raise InternalError(f"the {store.backend} key store has no synthetic PKCS#1 answers")
    synthetic = store.synthetic_plaintext(key_id, ciphertext, length)
    return plaintext if len(plaintext) == length else synthetic


def in_store(func: Callable[..., T], *args: Any) -> T:
    """Blocking key-store work with backend trouble translated to 503, whoever calls: the one place that
    decides what a caller learns of a KeyStoreError (nothing but "unavailable"; the log has the cause)."""
    try:
        return func(*args)
    except KeyStoreError as exc:
        raise keystore_unavailable(exc) from None


def keystore_unavailable(exc: KeyStoreError) -> Unavailable:
    """What a caller learns of a KeyStoreError; the log has the cause."""
    log.error("key store error: %s", exc)
    return Unavailable("key store unavailable", code="keystore_unavailable")


def _bad_length(length: int) -> InvalidRequest:
    return InvalidRequest(f"wrapped key must be {CIPHERTEXT_BYTES} bytes (RSA-3072), got {length}",
                          code="invalid_ciphertext_length")
