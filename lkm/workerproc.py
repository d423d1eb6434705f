"""One server process under the supervisor: `python -m lkm.workerproc` (started by lkm.supervisor, not by hand).

It serves the listening sockets it inherits, checks Hawk nonces in the table all processes share, writes its
metrics where the supervisor collects them (PROMETHEUS_MULTIPROC_DIR, set in its environment), and reports to
the supervisor over an inherited control socket, one JSON object a line: `started` (listeners up), `readiness`
(each time its checks ran) and `reloaded`. The control socket closing means the supervisor is gone: the
worker then drains and exits like on SIGTERM, so no orphan keeps serving.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
from enum import StrEnum
from pathlib import Path
from typing import Any

from lkm.config import Settings, load_settings
from lkm.errors import ConfigError, KeyStoreError, LkmError
from lkm.idleloop import IdleAwareLoop
from lkm.lifecycle import newest_active_id
from lkm.logs import setup_logging
from lkm.nonces import SharedNonceCache
from lkm.server import LkmServer
from lkm.serving import serve_forever
from lkm.web.balance import ConnectionBoard
from lkm.web.ops import ReadinessView
from lkm.web.routes import ListenerName


class WorkerEvent(StrEnum):
    STARTED = "started"
    READINESS = "readiness"
    RELOADED = "reloaded"


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lkm.workerproc")
    parser.add_argument("--config", required=True)
    parser.add_argument("--control", type=int, required=True, help="file descriptor of the control socket")
    parser.add_argument("--listener", action="append", default=[], help="NAME=FD of an inherited socket")
    parser.add_argument("--nonces", help="the shared Hawk nonce table")
    parser.add_argument("--board", help="the shared board of open platform connections (lkm.web.balance)")
    parser.add_argument("--slot", type=int, default=0, help="this worker's slot on the board")
    parser.add_argument("--cpu", type=int, help="the CPU this worker keeps to (limits.pin_workers)")
    return parser.parse_args(argv)


class Control:
    """The worker's end of the control socket."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)

    def send(self, event: WorkerEvent, **fields: Any) -> None:
        line = json.dumps({"event": event, **fields}).encode() + b"\n"
        with contextlib.suppress(OSError):  # the supervisor is gone; the reader below stops the worker
            self.sock.sendall(line)

    def watch(self, stop: asyncio.Event) -> None:
        self.sock.setblocking(False)
        loop = asyncio.get_running_loop()

        def readable() -> None:
            try:
                data = self.sock.recv(64)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(self.sock.fileno())
                stop.set()

        loop.add_reader(self.sock.fileno(), readable)


def _readiness(view: ReadinessView) -> dict[str, Any]:
    return {"ready": view.ready, "checks": {name: [ok, detail] for name, (ok, detail) in view.checks.items()}}


async def _run(args: argparse.Namespace, settings: Settings) -> None:
    config_path = Path(args.config)
    sockets = {ListenerName(name): socket.socket(fileno=int(fd))
               for name, fd in (item.split("=", 1) for item in args.listener)}
    nonces = SharedNonceCache(Path(args.nonces), settings.platform.hawk.timestamp_skew_seconds) \
        if args.nonces else None
    control = Control(args.control)
    board = ConnectionBoard(Path(args.board), args.slot) if args.board else None
    server = LkmServer(settings, processes=settings.limits.workers, sockets=sockets, nonce_cache=nonces, ops=False,
                       board=board)
    server.on_readiness = lambda view: control.send(WorkerEvent.READINESS, **_readiness(view))
    stop = asyncio.Event()
    control.watch(stop)

    def started(running: LkmServer) -> None:
        control.send(WorkerEvent.STARTED,
                     active_key=newest_active_id(running.store) if running.store is not None else None,
                     **_readiness(running.readiness))

    await serve_forever(settings, server=server, on_started=started, config_path=config_path, stop=stop,
                        on_reloaded=lambda error: control.send(WorkerEvent.RELOADED, error=error))


def _keep_to(cpu: int) -> None:
    """Pins this process to `cpu`; a CPU taken away since the supervisor counted them leaves it unpinned."""
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:
        print(f"lkm: worker {os.getpid()}: not pinned to CPU {cpu}: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(sys.argv[1:] if argv is None else argv)
    try:
        settings = load_settings(args.config)  # first: its defaults count the CPUs of the whole server
        if args.cpu is not None:
            _keep_to(args.cpu)  # before any thread starts, so that every thread inherits it
        log_writer = setup_logging(settings.logging.level, settings.logging.format)
        try:
            with asyncio.Runner(loop_factory=IdleAwareLoop) as runner:
                runner.run(_run(args, settings))
        finally:
            log_writer.stop()
    except (ConfigError, KeyStoreError, LkmError) as exc:  # as `lkm serve` reports them, with the worker's pid
        print(f"lkm: worker {os.getpid()}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
