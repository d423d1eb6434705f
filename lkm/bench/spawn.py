"""Starts `lkm serve` as a child process, so a benchmark can vary the server (worker threads, key count).

The child gets a config derived from a given one (normally a dev environment's): free ports chosen here, and
the overrides asked for. It is written next to the original, so relative paths keep their meaning, and
removed afterwards. Readiness is the operations listener's `/readyz` answering 200, as an orchestrator sees it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lkm.bench.requests import Target
from lkm.errors import SpawnError
from lkm.hawk_credentials import load_credentials_file


@dataclass(frozen=True)
class Spawned:
    pid: int
    config: Path
    ports: dict[str, int]
    ready_seconds: float  # from starting the process to /readyz answering 200

    def rss_bytes(self) -> int:
        return memory_of(self.pid)


def memory_of(pid: int) -> int:
    """Resident set size of a process, from /proc (0 when unknown)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stop_child(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Stops a child process if it still runs: SIGTERM, then SIGKILL after `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _derived_config(base: Path, ports: dict[str, int], overrides: dict[str, Any]) -> Path:
    config: dict[str, Any] = yaml.safe_load(base.read_text())
    for name, port in ports.items():
        section = config.setdefault(name, {})
        section["listen"] = {"host": "127.0.0.1", "port": port}
    for dotted, value in overrides.items():
        target = config
        *parents, last = dotted.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = value
    fd, name = tempfile.mkstemp(prefix=".lkm-bench-", suffix=".yaml", dir=base.parent)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    return Path(name)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def spawn_server(base_config: Path, overrides: dict[str, Any] | None = None, *,
                 timeout: float = 60.0, cpus: set[int] | None = None) -> Iterator[Spawned]:
    """`lkm serve -c <derived config>`; yields once ready, stops it (SIGTERM) on the way out.

    `cpus`: the CPUs the server may run on (set before it starts any thread, so that all inherit them).
    """
    ports = {"platform": free_port(), "native": free_port(), "ops": free_port()}
    config = _derived_config(base_config, ports, dict(overrides or {}))
    log_file = tempfile.TemporaryFile()  # noqa: SIM115 - closed below, after the child has exited
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "lkm", "serve", "-c", str(config)],
                               stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        if cpus:  # the interpreter is still starting up: its threads come later and inherit the mask
            os.sched_setaffinity(process.pid, cpus)
        while not _ready(ports["ops"]):
            if process.poll() is not None or time.perf_counter() - started > timeout:
                log_file.seek(0)
                tail = log_file.read()[-2000:].decode("utf-8", "replace")
                raise SpawnError(f"lkm serve -c {config} did not become ready:\n{tail}")
            time.sleep(0.01)
        yield Spawned(process.pid, config, ports, time.perf_counter() - started)
    finally:
        stop_child(process, 20)
        config.unlink(missing_ok=True)
        log_file.close()


def dev_target(dev_dir: Path, spawned: Spawned) -> Target:
    """How to call a server spawned from a dev environment's config (its CA, admin client, Hawk id)."""
    facts_config: dict[str, Any] = yaml.safe_load(spawned.config.read_text())
    hawk_file = dev_dir / "hawk.json"
    credentials = load_credentials_file(hawk_file) if hawk_file.exists() else {}
    path = (facts_config.get("platform") or {}).get("path", "/key-management/v1/decrypt")
    certs = dev_dir / "certs"
    return Target(platform_url=f"https://localhost:{spawned.ports['platform']}{path}",
                  native_url=f"https://localhost:{spawned.ports['native']}", ca_file=str(certs / "ca.pem"),
                  cert_file=str(certs / "admin.pem"), key_file=str(certs / "admin-key.pem"),
                  hawk=next(iter(credentials.values()), None), server_pid=spawned.pid,
                  config=str(dev_dir / "lkm.yaml"))


@contextlib.contextmanager
def busy_cores(cores: set[int]) -> Iterator[list[int]]:
    """One interpreter spinning on each of `cores` meanwhile: the neighbour a server has while the load generator
    drives it. Cores that share a physical core or its caches can slow each other: on the 2-vCPU test machine
    one A/B/A run had the RSA operation at 732-765 µs of CPU beside an idle core and 807-844 µs beside a busy
    one, while the suite's rounds have also shown no difference; the suite reports both figures.

    The spinners are started through a shell that exits at once, so they are not this process's descendants
    and its CPU figures leave them out. Yields their pids."""
    pids: list[int] = []
    try:
        for core in sorted(cores):
            started = subprocess.run(["sh", "-c", f"'{sys.executable}' -c 'while True: pass' "
                                      ">/dev/null 2>&1 </dev/null & echo $!"],
                                     capture_output=True, text=True, check=True, timeout=10)
            pids.append(int(started.stdout.strip()))
            os.sched_setaffinity(pids[-1], {core})
        time.sleep(0.2)  # every spinner running before the measurement starts
        yield pids
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
