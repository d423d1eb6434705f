"""Composition: key store, audit trail, metrics, service, TLS contexts, listeners, background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import secrets
import signal
import socket
import ssl
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from lkm import __version__
from lkm.admission import Admission, runs_inline
from lkm.audit import AuditLog
from lkm.auth import ClientPolicy
from lkm.callerguard import guard_for
from lkm.config import KeyStoreType, ReplayCheck, Settings, load_settings
from lkm.errors import ConfigError, KeyStoreError, LkmError
from lkm.hawk import CredentialSource, HawkVerifier, Verified
from lkm.keyadmin import KeyAdmin
from lkm.keys import PADDINGS, Algorithm, KeyState, utcnow
from lkm.keystore import KeyStore
from lkm.keystore.health import ReportsHealth, StoreStatus
from lkm.keystore.open import open_keystore
from lkm.metrics import AUTH_REASONS, OTHER_ROUTE, Metrics
from lkm.nonces import NonceStore
from lkm.pki import load_cert_expiry
from lkm.reload import Reloadable, SwappableContext, inline_credentials, tls_context
from lkm.sdnotify import Notifier
from lkm.service import KeyService
from lkm.threadnames import LOOP, name_this_thread
from lkm.web.admin import install_admin_routes
from lkm.web.batch import install_batch_route
from lkm.web.native import native_app
from lkm.web.ops import ReadinessView, ops_app
from lkm.web.platform import PlatformHandler, platform_server
from lkm.web.plumbing import WebContext, WebObserver
from lkm.web.routes import ListenerName
from lkm.workers import WorkerThreads

log = logging.getLogger("lkm.server")

CANARY_INTERVAL_SECONDS = 30.0
READINESS_INTERVAL_SECONDS = 5.0
# How long a thread may hold the GIL while another waits for it. A worker thread whose RSA operation (run with
# the GIL released) has finished waits for the GIL before it can hand the result back; with Python's default
# of 5 ms, a busy event loop can keep that core idle for up to 5 ms per operation. 1 ms raised throughput and
# cut tail latency in `lkm bench` runs on a 2-vCPU machine (README: Performance).
SWITCH_INTERVAL_SECONDS = 0.001


class MetricsObserver(WebObserver):
    """Feeds the web layer's and the service's events into Prometheus collectors.

    Metrics must never break a request: a label outside the closed sets is logged and dropped.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._inflight: dict[str, Any] = {name: metrics.inflight.labels(name) for name in ListenerName}

    def _safely(self, func: Any, *args: Any) -> None:
        try:
            func(*args)
        except ValueError as exc:
            log.warning("metric not recorded: %s", exc)

    def request_done(self, listener: str, route: str, method: str, status: int, seconds: float) -> None:
        self._safely(self.metrics.observe_http, listener, None if route == OTHER_ROUTE else route, method, status,
                     seconds)

    def inflight(self, listener: str, delta: int) -> None:
        self._inflight[listener].inc(delta)

    def auth_failure(self, method: str, reason: str) -> None:
        self._safely(self.metrics.auth_failed, method, reason if reason in AUTH_REASONS else "malformed")

    def unwrap_done(self, route: str, key_id: str | None, outcome: str, seconds: float) -> None:
        self._safely(self.metrics.observe_unwrap, route, outcome, seconds, key_id)

    def keystore_op(self, backend: str, operation: str, seconds: float) -> None:
        self._safely(self.metrics.observe_keystore, backend, operation, seconds)


@dataclass
class Listener:
    name: ListenerName
    site: web.BaseSite
    host: str
    port: int
    tls: bool


class LkmServer:
    """One running lkm: start() brings every listener up, stop() takes everything down in order."""

    def __init__(self, settings: Settings, *, processes: int = 1,
                 sockets: dict[ListenerName, socket.socket] | None = None,
                 nonce_cache: NonceStore | None = None, ops: bool = True) -> None:
        """`processes`: how many server processes share the listeners (with one per core, RSA runs inline);
        `sockets`: listening sockets a supervisor bound (the listeners then serve those, not new ones);
        `nonce_cache`: the Hawk nonces shared with the other processes; `ops`: serve the ops listener here."""
        self.settings = settings
        self._sockets = sockets or {}
        self._nonce_cache = nonce_cache
        self._serve_ops = ops
        self.reloadable = Reloadable()
        self.on_readiness: Callable[[ReadinessView], None] | None = None
        self.metrics = Metrics()
        self.observer = MetricsObserver(self.metrics)
        self.readiness = ReadinessView()
        self.listeners: dict[str, Listener] = {}  # by ListenerName
        self._runners: list[web.BaseRunner] = []
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

    # --- life cycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        self.store = await loop.run_in_executor(self._executor, open_keystore, settings.keystore)
        settings.audit.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.audit = AuditLog(settings.audit.path, max_bytes=settings.audit.max_bytes,
                              keep_files=settings.audit.keep_files,
                              on_failure=self.metrics.audit_failures.inc, on_written=self.metrics.audit_records.inc)
        await self.audit.start()
        parallel = 1 if self._workers is None else settings.limits.worker_threads
        if settings.keystore.type == "pkcs11":  # at most one operation per HSM session runs at a time
            parallel = min(parallel, settings.keystore.pool_size)
        admission = Admission(self._workers, deadline_seconds=settings.limits.request_deadline_ms / 1000,
                              workers=parallel, on_shed=self._count_shed)
        self.service = KeyService(self.store, self.audit, self._executor,
                                  observer=self.observer,
                                  fail_closed=settings.audit.fail_closed, admission=admission,
                                  pkcs1_length=settings.platform.pkcs1_data_key_length,
                                  guard=guard_for(settings, self.metrics))
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
            keepalive = float(settings.limits.keep_alive_seconds)
            runner = web.ServerRunner(platform_server(handler, keepalive_timeout=keepalive), handle_signals=False)
            listen = settings.platform.listen
            await self._listen(ListenerName.PLATFORM, runner, listen.host, listen.port, ssl_ctx)
        if settings.native is not None:
            ssl_ctx = self._reloadable_context(ListenerName.NATIVE)
            self.reloadable.policy = ClientPolicy(settings.native.clients)
            native = native_app(wctx, self.reloadable.policy)
            install_admin_routes(native, self.keyadmin)
            install_batch_route(native, settings.native.max_batch)
            await self._listen(ListenerName.NATIVE, self._app_runner(native), settings.native.listen.host,
                               settings.native.listen.port, ssl_ctx)
        if settings.ops.enabled and self._serve_ops:
            await self._listen(ListenerName.OPS, self._app_runner(ops_app(wctx, self.readiness, self.metrics.render)),
                               settings.ops.listen.host, settings.ops.listen.port, None)
        await self.update_readiness(force_canary=True)
        # Keys and Hawk credentials that the CLI or another server changed show up within seconds.
        self._tasks.append(asyncio.create_task(self._every(settings.limits.refresh_seconds, self.refresh, "refresh"),
                                               name="lkm-refresh"))
        self._tasks.append(asyncio.create_task(self._every(READINESS_INTERVAL_SECONDS, self.update_readiness,
                                                           "readiness check"), name="lkm-readiness"))
        if settings.rotation is not None:
            # The first look is immediate: a rotation missed while the server was down happens now.
            self._tasks.append(asyncio.create_task(self.keyadmin.schedule_loop(settings.limits.refresh_seconds),
                                                   name="lkm-rotation"))
        if settings.genesys is not None:
            self.keyadmin.resume_registrations()
        log.info("lkm started", extra={"listeners": {n: f"{lst.host}:{lst.port}"
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

    def _count_shed(self, route: str) -> None:
        self.metrics.shed.labels(ListenerName.PLATFORM if route == ListenerName.PLATFORM else ListenerName.NATIVE).inc()

    def _app_runner(self, app: web.Application) -> web.AppRunner:
        return web.AppRunner(app, access_log=None, keepalive_timeout=float(self.settings.limits.keep_alive_seconds),
                             handle_signals=False)

    async def _listen(self, name: ListenerName, runner: web.BaseRunner, host: str, port: int, ssl_ctx: Any) -> None:
        await runner.setup()
        sock = self._sockets.get(name)
        site: web.BaseSite = web.SockSite(runner, sock, ssl_context=ssl_ctx) if sock is not None else \
            web.TCPSite(runner, host, port, ssl_context=ssl_ctx, backlog=1024, reuse_address=True)
        await site.start()
        self._runners.append(runner)
        bound_port = port
        sockets = getattr(site._server, "sockets", None)  # aiohttp exposes the bound sockets only here
        if sockets:
            bound_port = sockets[0].getsockname()[1]
        self.listeners[name] = Listener(name, site, host, bound_port, ssl_ctx is not None)

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
        for runner in reversed(self._runners):
            await runner.cleanup()
        if self.audit is not None:
            await self.audit.close()
        if self.store is not None:
            self.store.close()
        if self._workers is not None:
            self._workers.close()
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
        self._update_key_gauges()

    def _update_key_gauges(self) -> None:
        assert self.store is not None
        keys = self.store.list_keys()
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


def forbid_core_dumps() -> None:
    """A core dump of this process would hold private keys and unwrapped data keys: allow none."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def listener_url(host: str, port: int, *, tls: bool) -> str:
    shown = "localhost" if host in ("0.0.0.0", "127.0.0.1", "::", "::1") else host  # noqa: S104
    return f"{'https' if tls else 'http'}://{shown}:{port}"


async def reload_from(server: LkmServer, config_path: Path) -> str | None:
    """Re-reads the config file and applies what a reload changes; the refusal's reason, or None."""
    loop = asyncio.get_running_loop()
    try:
        settings = await loop.run_in_executor(None, load_settings, config_path)
        await loop.run_in_executor(None, server.reload, settings)
    except (ConfigError, LkmError, OSError, ValueError, ssl.SSLError) as exc:
        log.error("reload refused, the previous settings stay in force: %s", exc)
        return str(exc)
    return None


async def serve_forever(settings: Settings, *, on_started: Any = None, server: LkmServer | None = None,
                        config_path: Path | None = None, notifier: Notifier | None = None,
                        on_reloaded: Callable[[str | None], None] | None = None,
                        stop: asyncio.Event | None = None) -> None:
    """Runs one server until SIGTERM/SIGINT (or `stop`); SIGHUP reloads from `config_path`."""
    forbid_core_dumps()
    name_this_thread(LOOP)
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    server = server or LkmServer(settings)
    notifier = notifier or Notifier()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()

    async def reload() -> None:
        assert config_path is not None
        notifier.reloading()
        error = await reload_from(server, config_path)
        notifier.ready("reload refused" if error else "reloaded")
        if on_reloaded is not None:
            on_reloaded(error)

    if config_path is not None:
        loop.add_signal_handler(signal.SIGHUP, lambda: _keep(reloads, asyncio.create_task(reload())))
    await server.start()
    # Everything built at start-up (modules, the app, the keys) lives as long as the process: moved out of the
    # collector's sight, a full collection under load walks only what requests allocate, and its pause (15 ms
    # measured under load on the platform route) stays out of the unwrap latency's tail.
    gc.collect()
    gc.freeze()
    watchdog = asyncio.create_task(notifier.keep_watchdog(), name="lkm-watchdog")
    try:
        if on_started is not None:
            on_started(server)
        notifier.ready("serving")
        await stop.wait()
    finally:
        log.info("lkm stopping")
        notifier.stopping()
        watchdog.cancel()
        await server.stop()


def _keep(tasks: set[asyncio.Task[None]], task: asyncio.Task[None]) -> None:
    tasks.add(task)
    task.add_done_callback(tasks.discard)
