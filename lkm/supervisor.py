"""`lkm serve` with `limits.workers` above 1: a parent process that binds, spawns, watches and signals.

The parent binds every listening socket once and hands them to each worker (`python -m lkm.workerproc`, a
fresh interpreter: spawned, never forked, so no PKCS#11 library or key is ever copied into a child). All
workers accept from the same queues; a worker that dies leaves its unaccepted connections to the others.
The parent opens no key store, holds no key and does no unwrap. It:

- serves the ops listener: /readyz is ready only while every worker serves and passes its checks, /metrics
  adds up every worker's values (prometheus-client multiprocess mode in a private run directory);
- replaces a worker that exits (logged; the delay doubles while a worker keeps dying young, up to 30 s);
- forwards SIGHUP to every worker and tells systemd RELOADING=1 until each has answered;
- on SIGTERM or SIGINT tells systemd STOPPING=1 and lets every worker drain its in-flight requests;
- tells systemd READY=1 once every worker serves, and pings its watchdog;
- stops everything if a worker fails before all have started (a broken configuration or host), so that
  `lkm serve` exits with an error as a single process would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from lkm.config import PinWorkers, Settings, load_settings
from lkm.errors import ConfigError, LkmError
from lkm.metrics import forget_process, render_processes
from lkm.nonces import create_table
from lkm.sdnotify import Notifier
from lkm.server import listener_url
from lkm.serving import forbid_core_dumps
from lkm.web.balance import ConnectionBoard
from lkm.web.connections import listening_socket, raise_descriptor_limit
from lkm.web.ops import ReadinessView, supervisor_ops_app
from lkm.web.routes import ListenerName
from lkm.workerproc import WorkerEvent

log = logging.getLogger("lkm.supervisor")

FIRST_RESTART_DELAY = 0.5
MAX_RESTART_DELAY = 30.0
HEALTHY_LIFETIME = 30.0  # a worker that lived this long resets the restart delay
STOP_GRACE_SECONDS = 90.0  # longer than aiohttp's own drain of in-flight requests (60 s)
RELOAD_TIMEOUT_SECONDS = 30.0

OnServing = Callable[[dict[str, str], str | None], None]


@dataclass
class Slot:
    """One worker position: the process in it now, and what it last reported."""

    index: int
    process: asyncio.subprocess.Process | None = None
    serving: bool = False
    checks: dict[str, tuple[bool, str]] = field(default_factory=dict)
    active_key: str | None = None
    reloaded: asyncio.Future[str | None] | None = None


class Supervisor:
    def __init__(self, settings: Settings, config_path: Path, notifier: Notifier,
                 on_serving: OnServing | None = None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.notifier = notifier
        self.on_serving = on_serving
        self.slots = [Slot(i) for i in range(settings.limits.workers)]
        self.cpus = worker_cpus(settings.limits.workers, settings.limits.pin_workers)  # by slot, or None
        self.readiness = ReadinessView()
        self.sockets: dict[ListenerName, socket.socket] = {}
        self.urls: dict[str, str] = {}
        self._stopping = asyncio.Event()
        self._announced = False
        self.failed = False  # a worker failed to start: `lkm serve` exits with status 1
        self._run_dir = Path(tempfile.mkdtemp(prefix="lkm-run-"))
        self._metrics_dir = self._run_dir / "metrics"
        self._nonces = self._run_dir / "nonces"
        self._board = self._run_dir / "connections"
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- life cycle ----------------------------------------------------------------------------------------

    async def run(self) -> None:
        forbid_core_dumps()
        raise_descriptor_limit()  # the parent holds the listening sockets and serves the ops listener
        settings = self.settings
        self._metrics_dir.mkdir(mode=0o700)
        create_table(self._nonces, settings.platform.hawk.nonce_cache_size)
        ConnectionBoard.create(self._board, len(self.slots))
        if settings.platform.enabled:
            listen = settings.platform.listen
            self._bind(ListenerName.PLATFORM, listen.host, listen.port, tls=settings.platform.tls is not None)
        if settings.native is not None:
            self._bind(ListenerName.NATIVE, settings.native.listen.host, settings.native.listen.port, tls=True)
        runner: web.AppRunner | None = None
        if settings.ops.enabled:
            runner = web.AppRunner(supervisor_ops_app(self.readiness, self._render_metrics), access_log=None,
                                   handle_signals=False)
            await runner.setup()
            ops = listening_socket(settings.ops.listen.host, settings.ops.listen.port)
            await web.SockSite(runner, ops).start()
            self.urls[ListenerName.OPS] = listener_url(settings.ops.listen.host, ops.getsockname()[1], tls=False)
        self._update_readiness()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn_task(self.reload()))
        slots = [asyncio.create_task(self._keep_filled(slot), name=f"lkm-slot-{slot.index}")
                 for slot in self.slots]
        watchdog = asyncio.create_task(self.notifier.keep_watchdog(), name="lkm-watchdog")
        log.info("lkm supervisor started", extra={"workers": len(self.slots), "listeners": self._shown_urls()})
        try:
            await self._stopping.wait()
        finally:
            log.info("lkm stopping: draining %d worker(s)", len(self.slots))
            self.notifier.stopping()
            self._stopping.set()
            await asyncio.gather(*slots, return_exceptions=True)
            watchdog.cancel()
            if runner is not None:
                await runner.cleanup()
            for sock in self.sockets.values():
                sock.close()
            shutil.rmtree(self._run_dir, ignore_errors=True)

    def _bind(self, name: ListenerName, host: str, port: int, *, tls: bool) -> None:
        sock = listening_socket(host, port)
        self.sockets[name] = sock
        self.urls[name] = listener_url(host, sock.getsockname()[1], tls=tls)

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- workers -------------------------------------------------------------------------------------------

    async def _keep_filled(self, slot: Slot) -> None:
        """Runs a worker in `slot` until stopping; replaces it whenever it exits."""
        loop = asyncio.get_running_loop()
        delay = FIRST_RESTART_DELAY
        while not self._stopping.is_set():
            began = loop.time()
            code = await self._run_worker(slot)
            if self._stopping.is_set():
                return
            if not self._announced:  # a worker that cannot start means the configuration or host is broken
                log.error("worker %d failed to start (%s); stopping", slot.index, _exit_text(code))
                self.failed = True
                self._stopping.set()
                return
            lived = loop.time() - began
            delay = FIRST_RESTART_DELAY if lived >= HEALTHY_LIFETIME else min(delay * 2, MAX_RESTART_DELAY)
            log.error("worker %d exited (%s) after %.1f s; starting a new one in %.1f s",
                      slot.index, _exit_text(code), lived, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _run_worker(self, slot: Slot) -> int:
        parent_end, child_end = socket.socketpair()
        fds = {name: sock.fileno() for name, sock in self.sockets.items()}
        args = [sys.executable, "-m", "lkm.workerproc", "--config", str(self.config_path),
                "--control", str(child_end.fileno()), "--nonces", str(self._nonces),
                "--board", str(self._board), f"--slot={slot.index}",
                *([f"--cpu={self.cpus[slot.index]}"] if self.cpus is not None else []),
                *(f"--listener={name}={fd}" for name, fd in fds.items())]
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self._metrics_dir)}
        try:
            process = await asyncio.create_subprocess_exec(*args, pass_fds=(child_end.fileno(), *fds.values()),
                                                           env=env)
        finally:
            child_end.close()
        slot.process = process
        reader = asyncio.create_task(self._read_reports(slot, parent_end))
        stopper = asyncio.create_task(self._stop_on_request(process))
        try:
            return await process.wait()
        finally:
            stopper.cancel()
            reader.cancel()
            parent_end.close()
            slot.process, slot.serving, slot.checks = None, False, {}
            ConnectionBoard.vacate(self._board, slot.index)  # no worker waits on an empty slot
            if slot.reloaded is not None and not slot.reloaded.done():
                slot.reloaded.set_result("worker exited")
            forget_process(str(self._metrics_dir), process.pid)
            self._update_readiness()

    async def _stop_on_request(self, process: asyncio.subprocess.Process) -> None:
        await self._stopping.wait()
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE_SECONDS)
        except TimeoutError:
            log.error("worker pid %d did not stop within %.0f s; killing it", process.pid, STOP_GRACE_SECONDS)
            with contextlib.suppress(ProcessLookupError):
                process.kill()

    async def _read_reports(self, slot: Slot, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            while line := await reader.readline():
                try:
                    report = json.loads(line)
                except ValueError:
                    continue
                self._on_report(slot, report)
        finally:
            writer.transport.abort()

    def _on_report(self, slot: Slot, report: dict[str, Any]) -> None:
        event = report.get("event")
        if event in (WorkerEvent.STARTED, WorkerEvent.READINESS):
            slot.checks = {name: (bool(ok), str(detail)) for name, (ok, detail) in report["checks"].items()}
            if event == WorkerEvent.STARTED:
                slot.serving, slot.active_key = True, report.get("active_key")
            self._update_readiness()
            self._announce_once()
        elif event == WorkerEvent.RELOADED and slot.reloaded is not None and not slot.reloaded.done():
            slot.reloaded.set_result(report.get("error"))

    def _announce_once(self) -> None:
        if self._announced or not all(slot.serving for slot in self.slots):
            return
        self._announced = True
        if self.on_serving is not None:
            self.on_serving(dict(self.urls), next((s.active_key for s in self.slots if s.active_key), None))
        self.notifier.ready(f"serving with {len(self.slots)} worker processes")
        log.info("lkm serving", extra={"workers": len(self.slots), "listeners": self._shown_urls(),
                                       "worker_cpus": self.cpus})  # null: the kernel places them

    def _shown_urls(self) -> dict[str, str]:
        return {str(name): url for name, url in self.urls.items()}

    # --- what the ops listener shows -----------------------------------------------------------------------

    def _update_readiness(self) -> None:
        serving = [slot for slot in self.slots if slot.serving]
        checks: dict[str, tuple[bool, str]] = {
            "workers": (len(serving) == len(self.slots), f"{len(serving)}/{len(self.slots)} worker processes serving")}
        for slot in serving:
            for name, (ok, detail) in slot.checks.items():
                if name not in checks or (checks[name][0] and not ok):
                    checks[name] = (ok, detail if ok else f"worker {slot.index}: {detail}")
        self.readiness.checks = checks

    def _render_metrics(self) -> tuple[bytes, str]:
        return render_processes(str(self._metrics_dir))

    # --- reload --------------------------------------------------------------------------------------------

    async def reload(self) -> None:
        """SIGHUP: every worker re-reads the configuration; READY=1 once each has answered."""
        self.notifier.reloading()
        loop = asyncio.get_running_loop()
        try:
            settings = await loop.run_in_executor(None, load_settings, self.config_path)
            logging.getLogger().setLevel(settings.logging.level.upper())
        except (ConfigError, LkmError, OSError, ValueError) as exc:
            log.error("reload refused, the previous settings stay in force: %s", exc)
        waits = []
        for slot in self.slots:
            if slot.serving and slot.process is not None and slot.process.returncode is None:
                slot.reloaded = loop.create_future()
                waits.append(slot.reloaded)
                with contextlib.suppress(ProcessLookupError):
                    slot.process.send_signal(signal.SIGHUP)
        done, pending = await asyncio.wait(waits, timeout=RELOAD_TIMEOUT_SECONDS) if waits else (set(), set())
        refused = [f.result() for f in done if f.result()] + ["no answer"] * len(pending)
        self.notifier.ready(f"reload refused by {len(refused)} worker(s)" if refused else "reloaded")


def worker_cpus(workers: int, pin: PinWorkers) -> list[int] | None:
    """The CPU each worker slot keeps to, or None: with one worker per CPU the process may use, each on its own.

    Why: unpinned, the kernel at times ran both workers of a 2-CPU server on one CPU while the other idled, and
    moved them between CPUs. Pinned, beside a load generator (six alternating pairs), the CPUs idled 2.8-3.4% of
    the time instead of 5.0-7.0%, and the server answered 1,881 unwraps/s instead of 1,836 (medians). With more
    workers than CPUs, or fewer, a pinned worker would be held to a CPU others need too: the kernel places them.
    A host that shares these CPUs with other busy work may prefer `pin_workers: off`."""
    cpus = sorted(os.sched_getaffinity(0))
    if pin is PinWorkers.OFF or workers < 2 or workers != len(cpus):
        return None
    return cpus


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"
