"""The real `lkm serve` with several worker processes, in a child process, as an operator runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Any

from tests.lkmcli import LKM


class ServeProcess:
    """Starts `lkm serve -c CONFIG`, waits for its "lkm serving" line and knows its URLs and workers."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self._log: IO[str] = log.open("w")
        self.log_path = log
        self.proc = subprocess.Popen([*LKM, "serve", "-c", str(config)], stdout=subprocess.PIPE, text=True,
                                     stderr=self._log, env={**os.environ, **(env or {})})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("lkm serving: "):
            self.stop()
            raise AssertionError(f"lkm serve did not start: {line!r} {log.read_text()}")
        self.urls = dict(item.split(" ", 1) for item in line.removeprefix("lkm serving: ").strip().split(", "))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def workers(self) -> list[int]:
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        return sorted(int(pid) for pid in children)

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return code

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def wait_until(check: Any, within: float = 20.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.05)
