"""The floor: what the leanest Python TLS endpoint that unwraps gets on this machine, to set lkm's figures against.

`lkm bench --compare --floor` and `lkm bench suite` start it as a child process (`python -m lkm.bench.floor`)
on the server's own key store and TLS certificate, and drive it exactly as they drive lkm. It does nothing a
product must do: no Hawk, no audit record, no metrics, no log line, no input validation worth the name, no
limits. It is one asyncio protocol that finds Content-Length, hands the RSA operation to a worker thread and
writes the answer. The gap raw → floor is what asyncio, TLS and a thread hand-off cost on this machine before any
product code runs; the gap floor → lkm is lkm's own. Never expose it: it exists to be measured on the loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import select
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from lkm.bench.spawn import free_port, stop_child
from lkm.errors import FloorError
from lkm.keys import Algorithm
from lkm.keystore import KeyStore
from lkm.threadnames import LOOP, name_this_thread

if TYPE_CHECKING:
    from lkm.bench.requests import Target

MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024


class _FloorProtocol(asyncio.Protocol):
    def __init__(self, store: KeyStore, pool: ThreadPoolExecutor) -> None:
        self.store = store
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                self._answer(431, b"{}", close=True)
            return
        head = self.buffer[:end].lower()
        start = head.find(b"\r\ncontent-length:")
        length = 0
        if start >= 0:
            line_end = head.find(b"\r\n", start + 2)
            length = int(head[start + 17:line_end if line_end > 0 else None])
        if length > MAX_BODY:
            self._answer(413, b"{}", close=True)
            return
        if len(self.buffer) < end + 4 + length:
            return
        body = self.buffer[end + 4:end + 4 + length]
        self.buffer = self.buffer[end + 4 + length:]
        try:
            request = json.loads(body)
            ciphertext = base64.b64decode(request["body"])
            key_id = str(request["keypairId"])
        except (ValueError, KeyError, TypeError):
            self._answer(400, b"{}")
            return
        self.busy = True
        job = asyncio.get_running_loop().run_in_executor(self.pool, self.store.decrypt, key_id, ciphertext,
                                                         Algorithm.RSA_OAEP_SHA1)
        job.add_done_callback(self._done)

    def _done(self, job: asyncio.Future[bytes]) -> None:
        self.busy = False
        try:
            plaintext = job.result()
        except Exception:  # a benchmark tool: any failure is a plain 400
            self._answer(400, b"{}")
        else:
            self._answer(200, b'{"body":"' + base64.b64encode(plaintext) + b'"}')
        if self.buffer and self.transport is not None and not self.transport.is_closing():
            self._next()

    def _answer(self, status: int, body: bytes, *, close: bool = False) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        head = (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                + ("Connection: close\r\n" if close else "") + "\r\n")
        self.transport.write(head.encode("ascii") + body)
        if close:
            self.transport.close()


async def _serve(config: Path, port: int, threads: int) -> None:
    from lkm.config import load_settings  # noqa: PLC0415
    from lkm.keystore.open import open_keystore  # noqa: PLC0415
    from lkm.tlsconf import server_context  # noqa: PLC0415

    settings = load_settings(config)
    tls = settings.platform.tls
    if tls is None:
        raise SystemExit(f"{config}: the floor endpoint needs platform.tls")
    ssl_ctx = server_context(tls, require_client_cert=False, source=settings.source, setting="platform.tls")
    name_this_thread(LOOP)
    store = open_keystore(settings.keystore)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="floor-rsa", initializer=name_this_thread)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _FloorProtocol(store, pool), "127.0.0.1", port, ssl=ssl_ctx)
    print("ready", flush=True)
    try:
        await server.serve_forever()
    finally:
        pool.shutdown()
        store.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lkm.bench.floor", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="an lkm config: its key store and platform.tls")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.config, args.port, args.threads))


@contextlib.contextmanager
def spawn_floor(config: Path, *, threads: int | None = None, timeout: float = 30.0) -> Iterator[tuple[int, int]]:
    """Starts the floor endpoint on a free loopback port; yields (pid, port); stops it on the way out."""
    port = free_port()
    command = [sys.executable, "-m", "lkm.bench.floor", "--config", str(config), "--port", str(port)]
    if threads is not None:
        command += ["--threads", str(threads)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None
        readable, _, _ = select.select([process.stdout], [], [], timeout)
        line = process.stdout.readline() if readable else b""  # "ready" once listening; empty if it died
        if line.strip() != b"ready":
            process.kill()
            _, err = process.communicate(timeout=10)
            raise FloorError(f"the floor endpoint did not start: {err.decode('utf-8', 'replace')[-1500:]}")
        yield process.pid, port
    finally:
        stop_child(process, 10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


@contextlib.contextmanager
def floor_target(config: Path, target: Target, *, threads: int | None = None) -> Iterator[Target]:
    """The floor endpoint on `config`'s key store and certificate, as `target` with its platform URL and pid."""
    path = urllib.parse.urlsplit(target.platform_url or "").path or "/key-management/v1/decrypt"
    with spawn_floor(config, threads=threads) as (pid, port):
        yield dataclasses.replace(target, platform_url=f"https://localhost:{port}{path}", server_pid=pid)


if __name__ == "__main__":
    main(sys.argv[1:])
