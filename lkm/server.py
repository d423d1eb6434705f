"""Composition: key store, audit trail, metrics, service, TLS contexts, listeners, background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from lkm import __version__
from lkm.admission import Admission, runs_inline
from lkm.audit import AuditLog
from lkm.auth import ClientPolicy
from lkm.callerguard import guard_for
from lkm.config import KeyStoreType, ListenSettings, PlatformHttp, ReplayCheck, Settings
from lkm.errors import KeyStoreError, LkmError
from lkm.hawk import HawkVerifier, Verified
from lkm.hawk_credentials import CredentialSource
from lkm.idleloop import call_when_idle
from lkm.keyadmin import KeyAdmin
from lkm.keys import PADDINGS, Algorithm, KeyState, utcnow
from lkm.keystore import KeyStore
from lkm.keystore.health import ReportsHealth, StoreStatus
from lkm.keystore.open import open_keystore
from lkm.memory import MemoryReleaser
from lkm.metrics import Metrics
from lkm.nonces import NonceStore
from lkm.observer import MetricsObserver
from lkm.pki import load_cert_expiry
from lkm.reload import Reloadable, SwappableContext, inline_credentials
from lkm.service import KeyService
from lkm.threadnames import name_this_thread
from lkm.tlsconf import tls_context
from lkm.web.admin import install_admin_routes
from lkm.web.balance import ConnectionBoard
from lkm.web.batch import install_batch_route
from lkm.web.connections import ConnectionGuard, GuardedSocket
from lkm.web.lean import LeanSite
from lkm.web.native import native_app
from lkm.web.ops import ReadinessView, ops_app
from lkm.web.platform import PlatformHandler, platform_error_shape, platform_server
from lkm.web.plumbing import WebContext, error_shape
from lkm.web.protocol import ErrorShape, GuardedSite, ListenerPolicy
from lkm.web.routes import ListenerName
from lkm.workers import WorkerThreads

log = logging.getLogger("lkm.server")

CANARY_INTERVAL_SECONDS = 30.0
READINESS_INTERVAL_SECONDS = 5.0
TRIM_INTERVAL_SECONDS = 5.0  # README: Connection limits (memory)


@dataclass
class Listener:
    name: ListenerName
    site: web.BaseSite | LeanSite
    host: str
    port: int
    tls: bool


class LkmServer:
    """One running lkm: start() brings every listener up, stop() takes everything down in order."""

    def __init__(self, settings: Settings, *, processes: int = 1,
                 sockets: dict[ListenerName, socket.socket] | None = None,
                 nonce_cache: NonceStore | None = None, ops: bool = True,
                 board: ConnectionBoard | None = None) -> None:
        """`processes`: how many server processes share the listeners (with one per core, RSA runs inline);
        `sockets`: listening sockets a supervisor bound (the listeners then serve those, not new ones);
        `nonce_cache`: the Hawk nonces shared with the other processes; `ops`: serve the ops listener here;
        `board`: the platform connections each process holds, so that new ones go to the least busy."""
        self.settings = settings
        self._sockets = sockets or {}
        self._board = board
        self._nonce_cache = nonce_cache
        self._serve_ops = ops
        self.reloadable = Reloadable()
        self.on_readiness: Callable[[ReadinessView], None] | None = None
        self.metrics = Metrics()
        self.observer = MetricsObserver(self.metrics)
        self.readiness = ReadinessView()
        self.listeners: dict[str, Listener] = {}  # by ListenerName
        self._closers: list[Callable[[], Awaitable[None]]] = []  # each listener's stop, in start order
        self._tasks: list[asyncio.Task[None]] = []
        # Unwraps run on the event loop (one process per core) or on their own threads (`limits.worker_threads`),
        # behind admission control; the rest of the blocking work (refreshes, checks, key listings) runs here.
        self.rsa_inline = runs_inline(settings.limits.rsa_execution,
                                      in_process_store=settings.keystore.type != KeyStoreType.PKCS11,
                                      processes=processes, cpus=len(os.sched_getaffinity(0)))
        self._workers = None if self.rsa_inline else WorkerThreads(settings.limits.worker_threads, name="lkm-rsa")
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lkm-io",
                                            initializer=name_this_thread)
        # Key changes (RSA key generation, waiting for the key store's cross-process lock) run apart from the
        # refreshes, readiness checks and key listings of the executor above, so a rotation never delays them.
        self._admin_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lkm-admin",
                                                  initializer=name_this_thread)
        self.store: KeyStore | None = None
        self.audit: AuditLog | None = None
        self.service: KeyService | None = None
        self.hawk_source: CredentialSource | None = None
        self.shared_hawk: Any = None  # ClusterHawk when the store is PostgreSQL (credentials, nonces)
        self._nonce_executor: ThreadPoolExecutor | None = None
        self.keyadmin: KeyAdmin | None = None
        self._last_canary = 0.0
        self._memory = MemoryReleaser()

    # --- life cycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        self.store = await loop.run_in_executor(self._executor, open_keystore, settings.keystore)
        settings.audit.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        parallel = 1 if self._workers is None else settings.limits.worker_threads
        if settings.keystore.type == "pkcs11":  # at most one operation per HSM session runs at a time
            parallel = min(parallel, settings.keystore.pool_size)
        admission = Admission(self._workers, deadline_seconds=settings.limits.request_deadline_ms / 1000,
                              workers=parallel, on_shed=self._count_shed)
        # Each admitted unwrap ends in an audit record: while one is under way, a busy audit writer waits for it.
        self.audit = AuditLog(settings.audit.path, max_bytes=settings.audit.max_bytes,
                              keep_files=settings.audit.keep_files,
                              on_failure=self.metrics.audit_failures.inc, on_written=self.metrics.audit_records.inc,
                              records_coming=lambda: admission.outstanding > 0)
        call_when_idle(loop, self.audit.loop_idle)
        self.metrics.writes.attach(loop)
        await self.audit.start()
        self.service = KeyService(self.store, self.audit, self._executor,
                                  observer=self.observer,
                                  fail_closed=settings.audit.fail_closed, admission=admission,
                                  pkcs1_length=settings.platform.pkcs1_data_key_length,
                                  guard=guard_for(settings, self.metrics, self.store))
        await self._refresh_frozen()
        self.metrics.set_build_info(__version__)
        admin_service = KeyService(self.store, self.audit, self._admin_executor,
                                   observer=self.observer, fail_closed=settings.audit.fail_closed)
        self.keyadmin = KeyAdmin(admin_service, rotation=settings.rotation, genesys_settings=settings.genesys,
                                 metrics=self.metrics)
        self.metrics.set_config_info(keystore=self.store.backend, rotation=settings.rotation is not None,
                                     registration=settings.genesys is not None)
        wctx = WebContext(service=self.service, observer=self.observer,
                          max_body_bytes=settings.limits.max_body_bytes)

        if settings.platform.enabled:
            hawk = settings.platform.hawk
            self.hawk_source = CredentialSource(hawk.credentials_file, inline_credentials(settings))
            self.reloadable.hawk = self.hawk_source
            verifier = HawkVerifier(lookup=self.hawk_source.get, skew_seconds=hawk.timestamp_skew_seconds,
                                    replay_check=hawk.replay_check is not ReplayCheck.OFF,
                                    nonce_cache_size=hawk.nonce_cache_size, nonce_cache=self._nonce_cache)
            shared_nonces = await self._share_hawk(verifier) if settings.keystore.type is KeyStoreType.POSTGRESQL \
                else None
            ssl_ctx = self._reloadable_context(ListenerName.PLATFORM)
            handler = PlatformHandler(wctx, settings.platform, verifier, default_port=443 if ssl_ctx else 80,
                                      shared_nonces=shared_nonces)
            # lean: lkm's own HTTP/1.1 for the platform's requests (README: Performance); aiohttp: for comparison.
            runner = None if settings.platform.http is PlatformHttp.LEAN else \
                web.ServerRunner(platform_server(handler), handle_signals=False)
            # No lingering: a body the handler left unread (a caller Hawk refused) is never read.
            await self._listen(ListenerName.PLATFORM, runner, settings.platform.listen, ssl_ctx, platform_error_shape,
                               lingering_time=0.0, lean=handler)
        if settings.native is not None:
            ssl_ctx = self._reloadable_context(ListenerName.NATIVE)
            self.reloadable.policy = ClientPolicy(settings.native.clients)
            native = native_app(wctx, self.reloadable.policy)
            install_admin_routes(native, self.keyadmin)
            install_batch_route(native, settings.native.max_batch)
            await self._listen(ListenerName.NATIVE, self._app_runner(native), settings.native.listen, ssl_ctx,
                               error_shape(wctx.request_ids))
        if settings.ops.enabled and self._serve_ops:
            await self._listen(ListenerName.OPS, self._app_runner(ops_app(wctx, self.readiness, self.metrics.render)),
                               settings.ops.listen, None, error_shape(wctx.request_ids))
        await self.update_readiness(force_canary=True)
        # Keys and Hawk credentials that the CLI or another server changed show up within seconds.
        self._tasks.append(asyncio.create_task(self._every(settings.limits.refresh_seconds, self.refresh, "refresh"),
                                               name="lkm-refresh"))
        self._tasks.append(asyncio.create_task(self._every(READINESS_INTERVAL_SECONDS, self.update_readiness,
                                                           "readiness check"), name="lkm-readiness"))
        self._tasks.append(asyncio.create_task(self._every(TRIM_INTERVAL_SECONDS, self._release_memory,
                                                           "memory release"), name="lkm-memory"))
        if settings.rotation is not None:
            # The first look is immediate: a rotation missed while the server was down happens now.
            self._tasks.append(asyncio.create_task(self.keyadmin.schedule_loop(settings.limits.refresh_seconds),
                                                   name="lkm-rotation"))
        if settings.genesys is not None:
            self.keyadmin.resume_registrations()
        self._memory.start()
        log.info("lkm started", extra={"listeners": {str(n): f"{lst.host}:{lst.port}"
                                                      for n, lst in self.listeners.items()},
                                       "rsa": "inline" if self.rsa_inline else "threads"})

    async def _share_hawk(self, verifier: HawkVerifier) -> Callable[[Verified], Awaitable[bool]] | None:
        """Hawk credentials from the key store's database (`lkm hawk` writes there), and with replay_check:
        cluster the nonce check of every replica, run off the event loop."""
        from lkm.keystore.postgresql.hawk import ClusterHawk  # noqa: PLC0415 - optional extra, loaded on demand

        hawk = self.settings.platform.hawk
        assert self.hawk_source is not None and self.store is not None
        self.shared_hawk = shared = ClusterHawk.of(self.store, window_seconds=hawk.timestamp_skew_seconds)
        loop = asyncio.get_running_loop()
        self.hawk_source.set_shared(await loop.run_in_executor(self._executor, shared.load))
        shared.follow(self.hawk_source.set_shared)
        if hawk.replay_check is not ReplayCheck.CLUSTER:
            return None
        executor = self._nonce_executor = ThreadPoolExecutor(max_workers=self.settings.keystore.pool_max,
                                                             thread_name_prefix="lkm-nonce")

        async def fresh(verified: Verified) -> bool:
            return await loop.run_in_executor(executor, shared.remember, verified, verifier.nonce_cache)

        return fresh

    def _reloadable_context(self, name: ListenerName) -> Any:
        ctx = tls_context(self.settings, name)
        if ctx is None:
            return None
        self.reloadable.contexts[name] = SwappableContext(ctx)
        return ctx

    def reload(self, settings: Settings) -> None:
        """SIGHUP: new certificates, client CA, allow-list, Hawk credentials and log level, for new connections
        and requests; raises (ConfigError, OSError, ValueError) with the old settings still in force."""
        self.reloadable.apply(settings, lambda level: logging.getLogger().setLevel(level.upper()))

    async def _release_memory(self) -> None:
        released = self._memory.step()
        if released:
            log.info("memory given back after a burst", extra={"released_bytes": released})

    def _count_shed(self, route: str) -> None:
        self.metrics.shed.labels(ListenerName.PLATFORM if route == ListenerName.PLATFORM else ListenerName.NATIVE).inc()

    def _app_runner(self, app: web.Application) -> web.AppRunner:
        return web.AppRunner(app, access_log=None, handle_signals=False)

    async def _listen(self, name: ListenerName, runner: web.BaseRunner | None, listen: ListenSettings,
                      ssl_ctx: Any, shape: ErrorShape, *, lean: PlatformHandler | None = None,
                      **handler_options: Any) -> None:
        """One listener: a guarded socket (allow-list, connection caps) serving connections with a deadline;
        without a runner, `lean` serves it on lkm's own HTTP/1.1 protocol."""
        if runner is not None:
            await runner.setup()
            self._closers.append(runner.cleanup)
        observer = self.observer
        guard = ConnectionGuard(name, listen, on_refused=observer.connection_refused,
                                on_open=observer.connections_open,
                                board=self._board if name is ListenerName.PLATFORM else None)
        inherited = self._sockets.get(name)  # bound once by the supervisor and shared by every worker
        sock = GuardedSocket.adopt(inherited, guard) if inherited is not None else \
            GuardedSocket.listen_on(listen.host, listen.port, guard, backlog=1024)
        policy = ListenerPolicy(name, guard, listen.request_timeout_seconds, shape,
                                on_timeout=observer.connection_timed_out, on_malformed=observer.malformed_request)
        keep_alive = float(self.settings.limits.keep_alive_seconds)
        site: GuardedSite | LeanSite
        if runner is None:
            assert lean is not None
            site = LeanSite(lean, sock, policy, ssl_context=ssl_ctx, keep_alive=keep_alive)
            self._closers.append(site.cleanup)
        else:
            site = GuardedSite(runner, sock, policy, ssl_context=ssl_ctx, access_log=None,
                               keepalive_timeout=keep_alive, **handler_options)
        try:
            await site.start()
        except BaseException:
            sock.close()
            raise
        self.listeners[name] = Listener(name, site, listen.host, site.port, ssl_ctx is not None)

    def url(self, name: str) -> str:
        listener = self.listeners[name]
        return listener_url(listener.host, listener.port, tls=listener.tls)

    async def stop(self) -> None:
        if self.keyadmin is not None:
            await self.keyadmin.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for close in reversed(self._closers):
            await close()
        if self.audit is not None:
            await self.audit.close()
        if self.store is not None:
            self.store.close()
        if self._workers is not None:
            self._workers.close()
        self.metrics.writes.detach()  # before the process ends: a supervisor adds up what its files hold
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._admin_executor.shutdown(wait=True, cancel_futures=True)
        if self._nonce_executor is not None:
            self._nonce_executor.shutdown(wait=True, cancel_futures=True)

    # --- background work -----------------------------------------------------------------------------------

    async def _every(self, seconds: float, step: Callable[[], Awaitable[None]], what: str) -> None:
        """Runs `step` every `seconds` until cancelled; a failed step is logged and the next one runs on time."""
        while True:
            await asyncio.sleep(seconds)
            try:
                await step()
            except Exception:
                log.exception("%s failed", what)

    async def refresh(self) -> None:
        assert self.store is not None
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            await loop.run_in_executor(self._executor, self.store.refresh)
        except KeyStoreError as exc:
            log.error("key store refresh failed: %s", exc)
        self.observer.keystore_op(self.store.backend, "refresh", time.perf_counter() - started)
        if self.hawk_source is not None:
            try:
                await loop.run_in_executor(self._executor, self.hawk_source.reload_if_changed)
            except (OSError, ValueError) as exc:
                log.error("Hawk credentials reload failed: %s", exc)
            if self.shared_hawk is not None:
                try:
                    self.hawk_source.set_shared(await loop.run_in_executor(self._executor, self.shared_hawk.load))
                except KeyStoreError as exc:  # the database is away: the credentials loaded last stay live
                    log.warning("Hawk credentials not reloaded: %s", exc)
        await self._refresh_frozen()
        self._update_key_gauges()

    async def _refresh_frozen(self) -> None:
        """The frozen callers, read off the event loop (a file, or the PostgreSQL store's table)."""
        if self.service is not None and self.service.guard is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.service.guard.frozen.refresh)

    def _update_key_gauges(self) -> None:
        assert self.store is not None
        try:
            keys = self.store.list_keys()
        except KeyStoreError:
            return  # an HSM away since start-up: the gauges wait for its keys (the failed refresh is logged)
        self.metrics.set_key_states(Counter(k.state.value for k in keys))
        active = [k for k in keys if k.state is KeyState.ACTIVE]
        newest = max(active, key=lambda k: k.created) if active else None
        self.metrics.set_active_key(newest.created.timestamp() if newest else None)

    async def update_readiness(self, *, force_canary: bool = False) -> None:
        assert self.store is not None and self.audit is not None
        store = self.store
        loop = asyncio.get_running_loop()
        checks: dict[str, tuple[bool, str]] = {}
        try:
            await loop.run_in_executor(self._executor, store.check)
            health = store.health() if isinstance(store, ReportsHealth) else None
            if health is not None and health.status is StoreStatus.DEGRADED:
                # Unwraps go on with the keys held: stay in the load balancer, but say that changes cannot be made.
                checks["keystore"] = (True, f"{store.backend} {health.status}: {health.detail}")
            else:
                checks["keystore"] = (True, store.backend)
        except KeyStoreError as exc:
            log.error("key store check failed: %s", exc)
            checks["keystore"] = (False, "key store not available")
        keys = store.list_keys() if checks["keystore"][0] else []
        active = [k for k in keys if k.state is KeyState.ACTIVE]
        checks["active_key"] = (bool(active), f"{len(active)} active key(s)" if active else "no active key")
        checks["certificates"] = await loop.run_in_executor(self._executor, self._certificate_check)
        writable = await loop.run_in_executor(self._executor, self.audit.check_writable)
        audit_ok = writable and self.audit.healthy
        checks["audit"] = (audit_ok, "writable" if audit_ok else "audit trail not writable")
        now = time.monotonic()
        if active and checks["keystore"][0] and (force_canary or now - self._last_canary >= CANARY_INTERVAL_SECONDS):
            newest = max(active, key=lambda k: k.created)
            checks["canary"] = await self._canary(newest.id)
            self._last_canary = now
        elif "canary" in self.readiness.checks and active:
            checks["canary"] = self.readiness.checks["canary"]
        else:
            checks["canary"] = (False, "no active key to test")
        self.readiness.checks = checks
        if self.on_readiness is not None:
            self.on_readiness(self.readiness)
        self.metrics.set_readiness({name: ok for name, (ok, _) in checks.items()})
        self.metrics.set_keystore_up(store.backend, checks["keystore"][0])

    async def _canary(self, key_id: str) -> tuple[bool, str]:
        """A real unwrap with the active key: proves the private half is usable, not merely present."""
        assert self.store is not None
        store = self.store
        probe = secrets.token_bytes(32)

        def roundtrip() -> bool:
            wrapped = store.get_key(key_id).public_key.encrypt(probe, PADDINGS[Algorithm.RSA_OAEP_SHA1])
            return secrets.compare_digest(store.decrypt(key_id, wrapped, Algorithm.RSA_OAEP_SHA1), probe)

        try:
            ok = await asyncio.get_running_loop().run_in_executor(self._executor, roundtrip)
        except (KeyStoreError, LkmError) as exc:
            log.error("canary unwrap failed: %s", exc)
            ok = False
        return (ok, f"unwrap with {key_id} {'ok' if ok else 'failed'}")

    def _certificate_check(self) -> tuple[bool, str]:
        now = utcnow()
        problems = []
        for name, tls in ((ListenerName.PLATFORM, self.settings.platform.tls),
                          (ListenerName.NATIVE, self.settings.native.tls if self.settings.native else None)):
            if tls is None or name not in self.listeners:
                continue
            try:
                expiry = load_cert_expiry(tls.cert_file)
            except (OSError, ValueError):
                problems.append(f"{name}: certificate unreadable")
                continue
            self.metrics.set_certificate_expiry(name, expiry.timestamp())
            if expiry <= now:
                problems.append(f"{name}: certificate expired")
        return (not problems, "; ".join(problems) or "valid")


def listener_url(host: str, port: int, *, tls: bool) -> str:
    shown = "localhost" if host in ("0.0.0.0", "127.0.0.1", "::", "::1") else host  # noqa: S104
    return f"{'https' if tls else 'http'}://{shown}:{port}"
