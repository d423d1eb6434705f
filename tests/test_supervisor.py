"""The real multi-process server (`lkm serve` with limits.workers > 1): every guarantee holds across processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lkm import pki
from lkm.client import PlatformClient, client_ssl_context
from lkm.config import load_settings
from lkm.hawk import HawkCredential, sign_request
from lkm.keys import KeyRecord
from tests.conftest import Pki, b64, base_config, eventually, wrap, write_config
from tests.lkmcli import lkm_here
from tests.serveproc import ServeProcess, peer_serial, prepare

pytestmark = pytest.mark.slow
WORKERS = 2




def fresh_session() -> aiohttp.ClientSession:
    """Every request on a new connection, so the kernel hands them to all the workers."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


async def unwrap(server: ServeProcess, certs: Pki, credential: HawkCredential, record: KeyRecord) -> int:
    async with fresh_session() as session:
        client = PlatformClient(session, server.urls["platform"] + "/key-management/v1/decrypt", credential,
                                client_ssl_context(certs.ca_file))
        return (await client.decrypt(record.id, wrap(record, b"k" * 32))).status


async def get_json(url: str) -> tuple[int, Any]:
    async with fresh_session() as session, session.get(url) as response:
        return response.status, await response.json() if "json" in response.content_type else await response.text()


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def test_workers_serve_together_and_a_dead_one_is_replaced(tmp_path: Path, certs: Pki,
                                                                 config_factory: Callable[..., Path]) -> None:
    config = config_factory(**{"limits.workers": WORKERS})
    credential, record = prepare(config)
    with ServeProcess(config, tmp_path / "serve.log") as server:
        assert len(server.workers()) == WORKERS
        status, body = await get_json(server.urls["ops"] + "/readyz")
        assert status == 200 and body["checks"]["workers"]["detail"] == f"{WORKERS}/{WORKERS} worker processes serving"

        statuses = await asyncio.gather(*(unwrap(server, certs, credential, record) for _ in range(12)))
        assert statuses == [200] * 12
        _, text = await get_json(server.urls["ops"] + "/metrics")
        assert metric(text, 'lkm_unwraps_total{key_id="' + record.id + '",outcome="ok",route="platform"}') == 12
        assert metric(text, "lkm_ready ") == 1

        victim = server.workers()[0]
        os.kill(victim, signal.SIGKILL)

        async def not_ready() -> bool:
            status, body = await get_json(server.urls["ops"] + "/readyz")
            return status == 503 and not body["checks"]["workers"]["ok"]

        assert await eventually(not_ready, within=20.0)

        async def ready_again() -> bool:
            return (await get_json(server.urls["ops"] + "/readyz"))[0] == 200

        assert await eventually(ready_again, within=20.0)
        assert victim not in server.workers() and len(server.workers()) == WORKERS
        assert "killed by SIGKILL" in server.log_text()
        assert await unwrap(server, certs, credential, record) == 200
        _, text = await get_json(server.urls["ops"] + "/metrics")
        assert metric(text, 'lkm_unwraps_total{key_id="' + record.id + '",outcome="ok",route="platform"}') == 13
        workers = server.workers()
    assert server.proc.returncode == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


def threads_cpus(pid: int) -> list[set[int]]:
    """The CPUs each thread of process `pid` may run on."""
    return [os.sched_getaffinity(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")]


def serving_lines(server: ServeProcess) -> list[dict[str, Any]]:
    """The server's "lkm serving" log lines, parsed."""
    return [json.loads(line) for line in server.log_text().splitlines() if '"lkm serving"' in line]


def started_on(cpus: set[int], config: Path, log: Path) -> ServeProcess:
    """`lkm serve` started as under `taskset`: it may use `cpus` only."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        return ServeProcess(config, log)
    finally:
        os.sched_setaffinity(0, before)


@pytest.mark.long(8)
async def test_each_worker_keeps_to_a_cpu_of_its_own_when_there_is_one_per_cpu(
        tmp_path: Path, config_factory: Callable[..., Path]) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("a single CPU: no workers to keep apart")
    two = set(cpus[-2:])
    prepare(config_factory())
    # Pinning off (False: YAML's unquoted off), or not one worker per CPU: the kernel places them.
    for pin, workers in ((False, 2), ("auto", 3)):
        config = config_factory(**{"limits.workers": workers, "limits.pin_workers": pin, "logging.level": "info"})
        with started_on(two, config, tmp_path / f"serve-{pin}-{workers}.log") as server:
            assert len(server.workers()) == workers
            assert all(threads == two for pid in server.workers() for threads in threads_cpus(pid)), pin
            assert await eventually(lambda: [line["worker_cpus"] for line in serving_lines(server)] == [None])
    config = config_factory(**{"limits.workers": 2, "logging.level": "info"})  # pin_workers: auto
    with started_on(two, config, tmp_path / "serve.log") as server:
        kept = {}
        for pid in server.workers():
            threads = threads_cpus(pid)
            assert len(threads) > 3 and all(cpus == threads[0] and len(cpus) == 1 for cpus in threads), threads
            kept[pid] = next(iter(threads[0]))
        assert set(kept.values()) == two  # one worker on each

        assert await eventually(lambda: [line["worker_cpus"] for line in serving_lines(server)] == [sorted(two)],
                                within=5.0)

        victim = server.workers()[0]
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:
            return victim not in server.workers() and len(server.workers()) == 2

        assert await eventually(replaced, within=20.0)
        newcomer = next(pid for pid in server.workers() if pid not in kept)
        assert await eventually(lambda: len(threads_cpus(newcomer)) > 3, within=20.0)
        assert all(threads == {kept[victim]} for threads in threads_cpus(newcomer))  # its slot's CPU


async def test_a_replayed_request_is_refused_whichever_worker_gets_it_and_cli_changes_reach_every_worker(
        tmp_path: Path, certs: Pki, config_factory: Callable[..., Path]) -> None:
    """Two guarantees across the workers of one server: a replay is refused by whichever worker gets it, then
    (changing the store) a key disabled and a credential revoked with the CLI are refused by every worker."""
    config = config_factory(**{"limits.workers": WORKERS})
    credential, record = prepare(config)
    with ServeProcess(config, tmp_path / "serve.log") as server:
        url = server.urls["platform"] + "/key-management/v1/decrypt"
        port = int(url.split(":")[2].split("/")[0])
        body = json.dumps({"keypairId": record.id, "body": b64(wrap(record, b"r" * 32))}).encode()
        headers = {"Content-Type": "application/json", "Authorization": sign_request(
            credential, method="POST", resource="/key-management/v1/decrypt", host="localhost", port=port,
            content_type="application/json", body=body)}
        ssl_ctx = client_ssl_context(certs.ca_file)

        async def send() -> int:
            async with fresh_session() as session, session.post(url, data=body, headers=headers,
                                                                ssl=ssl_ctx) as response:
                return response.status

        statuses = await asyncio.gather(*(send() for _ in range(24)))
        assert sorted(statuses) == [200] + [401] * 23

        assert await unwrap(server, certs, credential, record) == 200
        lkm_here("keys", "disable", "--force", record.id, "-c", str(config))

        async def all_refused() -> bool:
            statuses = await asyncio.gather(*(unwrap(server, certs, credential, record) for _ in range(8)))
            return all(status != 200 for status in statuses)

        assert await eventually(all_refused, within=2.0)  # refresh_seconds is 0.2
        lkm_here("keys", "enable", record.id, "-c", str(config))
        lkm_here("hawk", "revoke", credential.id, "-c", str(config))

        async def all_unauthorized() -> bool:
            statuses = await asyncio.gather(*(unwrap(server, certs, credential, record) for _ in range(8)))
            return statuses == [401] * 8

        assert await eventually(all_unauthorized, within=2.0)


@pytest.mark.long(4)
async def test_sigkill_under_load_leaves_a_complete_audit_trail(tmp_path: Path, certs: Pki,
                                                               config_factory: Callable[..., Path]) -> None:
    config = config_factory(**{"limits.workers": WORKERS})
    credential, record = prepare(config)
    ok = 0
    with ServeProcess(config, tmp_path / "serve.log") as server:
        stop = asyncio.Event()

        async def client() -> None:
            nonlocal ok
            while not stop.is_set():
                with contextlib.suppress(aiohttp.ClientError):  # a connection of the killed worker
                    ok += await unwrap(server, certs, credential, record) == 200

        clients = [asyncio.create_task(client()) for _ in range(4)]

        def served(count: int) -> Callable[[], Any]:
            async def check() -> bool:
                return ok >= count
            return check
        assert await eventually(served(24), within=20.0)  # under load: unwraps answered and in flight on both workers
        os.kill(server.workers()[0], signal.SIGKILL)
        killed_at = ok
        assert await eventually(served(killed_at + 24), within=20.0)  # and the load goes on through the other worker
        stop.set()
        await asyncio.gather(*clients)
    audit = load_settings(config).audit.path
    verified = lkm_here("audit", "verify", str(audit), check=False)
    lines = [line for line in audit.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            assert number == len(lines), "only the last record may be torn"
            assert verified.returncode != 0 and f"line {number}" in verified.stdout  # reported, not dropped
    if len(records) == len(lines):
        assert verified.returncode == 0, verified.stdout
    unwrapped = [r for r in records if r.get("action") == "unwrap" and r.get("outcome") == "ok"
                 and r.get("route") == "platform"]
    assert ok > 0 and len(unwrapped) >= ok  # every 200 has its record


class NotifySocket:
    """Where the server's systemd notifications go, read as they come, as systemd does: a datagram socket holds
    only 10 unread messages (net.unix.max_dgram_qlen), and the server drops one that finds it full. Read only
    when the test looks, the watchdog's pings during a slow start filled it and READY=1 was lost (the test then
    waited for it forever, its socket time-out reset by each ping)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: queue.Queue[list[str]] = queue.Queue()
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name="notify-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                self.messages.put(self.sock.recv(4096).decode().splitlines())
            except TimeoutError:
                continue

    def next_message(self, wanted: str, within: float = 30.0) -> list[str]:
        """The next message with the line `wanted`, after the messages before it."""
        deadline = time.monotonic() + within
        while True:
            lines = self.messages.get(timeout=max(0.0, deadline - time.monotonic()))
            if wanted in lines:
                return lines

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()
        self._reader.join()
        self.sock.close()


@pytest.mark.parametrize("workers", [1, WORKERS])
async def test_systemd_hears_ready_reloading_and_stopping_and_sighup_renews_certificates(
        tmp_path: Path, own_certs: Pki, workers: int) -> None:
    certs = own_certs  # renewed on disk below: a private copy
    config = write_config(tmp_path, base_config(tmp_path, certs, **{"limits.workers": workers}))
    credential, record = prepare(config)
    notify_env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}
    with NotifySocket(tmp_path / "notify.sock") as notify, \
            ServeProcess(config, tmp_path / "serve.log", env=notify_env) as server:
        assert "READY=1" in notify.next_message("READY=1")
        notify.next_message("WATCHDOG=1")  # pinged every 0.2 s, half the timeout
        old = await peer_serial(server.urls["platform"], certs.ca_file)
        async with aiohttp.ClientSession() as keep_alive:  # one connection, made before the renewal
            client = PlatformClient(keep_alive, server.urls["platform"] + "/key-management/v1/decrypt", credential,
                                    client_ssl_context(certs.ca_file))
            assert (await client.decrypt(record.id, wrap(record, b"a" * 32))).status == 200
            renewed = pki.issue(certs.ca, "localhost", server=True, dns=("localhost",), ips=("127.0.0.1",))
            renewed.write(certs.dir / "server.pem", certs.dir / "server-key.pem")
            server.signal(signal.SIGHUP)
            reloading = notify.next_message("RELOADING=1")
            assert any(line.startswith("MONOTONIC_USEC=") for line in reloading)
            assert "STATUS=reloaded" in notify.next_message("READY=1")
            serials = {await peer_serial(server.urls["platform"], certs.ca_file) for _ in range(6)}
            assert serials == {renewed.cert.serial_number} and old not in serials
            assert (await client.decrypt(record.id, wrap(record, b"b" * 32))).status == 200
            assert len(keep_alive.connector._conns) == 1
        server.signal(signal.SIGTERM)
        notify.next_message("STOPPING=1")


async def test_overload_is_shed_with_retry_after_and_counted_across_workers(
        tmp_path: Path, certs: Pki, config_factory: Callable[..., Path]) -> None:
    """The burst rides on connections opened before it (96 TLS handshakes arriving with it would be most of the
    work). Which requests the deadline admits depends on how busy the host is: a slow or crowded one can miss it
    for all 96 (the in-process admission tests check the admitted still succeed); so this test asks for shedding
    and for counts that add up over the processes, and for a 200 once the burst is over."""
    burst = 96
    config = config_factory(**{"limits.workers": WORKERS, "limits.worker_threads": 1,
                               "limits.request_deadline_ms": 10})
    credential, record = prepare(config)
    with ServeProcess(config, tmp_path / "serve.log") as server:
        connector = aiohttp.TCPConnector(limit=burst)
        async with aiohttp.ClientSession(connector=connector) as session:
            ssl_context = client_ssl_context(certs.ca_file)
            health = server.urls["platform"] + "/key-management/v1/health"

            async def health_check() -> int:
                async with session.get(health, ssl=ssl_context) as response:
                    await response.read()
                    return response.status

            assert await asyncio.gather(*(health_check() for _ in range(burst))) == [200] * burst
            assert sum(len(idle) for idle in connector._conns.values()) == burst
            client = PlatformClient(session, server.urls["platform"] + "/key-management/v1/decrypt", credential,
                                    ssl_context)
            replies = await asyncio.gather(*(client.decrypt(record.id, wrap(record, b"s" * 32))
                                             for _ in range(burst)))
            assert sum(len(idle) for idle in connector._conns.values()) == burst  # no new connection
            later: list[int] = []  # one at a time: a crowded host may still preempt one past 10 ms
            while 200 not in later and len(later) < 5:
                later.append((await client.decrypt(record.id, wrap(record, b"t" * 32))).status)
        statuses = [reply.status for reply in replies]
        assert 503 in statuses and set(statuses) <= {200, 503}, statuses
        assert later[-1] == 200, later
        statuses += later
        assert all(reply.headers["Retry-After"] == "1" for reply in replies if reply.status == 503)
        _, text = await get_json(server.urls["ops"] + "/metrics")
        assert metric(text, "lkm_requests_shed_total") == statuses.count(503)
        assert metric(text, 'lkm_unwraps_total{key_id="' + record.id + '",outcome="ok"') == statuses.count(200)
