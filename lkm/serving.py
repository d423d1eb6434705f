"""One server process from start to stop: process limits, signals (SIGTERM drains, SIGHUP reloads), systemd's
readiness protocol, and the garbage collector set for a long-lived process."""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lkm.config import Settings, load_settings
from lkm.errors import ConfigError, LkmError
from lkm.sdnotify import Notifier
from lkm.server import LkmServer
from lkm.threadnames import LOOP, name_this_thread
from lkm.web.connections import raise_descriptor_limit

log = logging.getLogger("lkm.server")

# How long a thread may hold the GIL while another waits for it. A worker thread whose RSA operation (run with
# the GIL released) has finished waits for the GIL before it can hand the result back; with Python's default
# of 5 ms, a busy event loop can keep that core idle for up to 5 ms per operation. 1 ms raised throughput and
# cut tail latency in `lkm bench` runs on a 2-vCPU machine (README: Performance).
SWITCH_INTERVAL_SECONDS = 0.001


def forbid_core_dumps() -> None:
    """A core dump of this process would hold private keys and unwrapped data keys: allow none."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


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
    raise_descriptor_limit()
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
