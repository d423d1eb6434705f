"""The real `lkm serve` with several worker processes, in a child process, as an operator runs it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Any

from cryptography import x509

from lkm.client import client_ssl_context
from lkm.config import load_settings
from lkm.hawk import HawkCredential
from lkm.hawk_credentials import mint_credential
from lkm.keys import KeyRecord, KeyState
from lkm.keystore.file import FileKeyStore
from tests.conftest import pooled_key
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


def prepare(config: Path) -> tuple[HawkCredential, KeyRecord]:
    """A Hawk credential and an active key in the file store `config` names, made before a server starts."""
    settings = load_settings(config)
    assert settings.platform.hawk.credentials_file is not None and settings.keystore.passphrase is not None
    assert settings.keystore.path is not None
    credential = mint_credential(settings.platform.hawk.credentials_file, "platform-test")
    store = FileKeyStore(settings.keystore.path, settings.keystore.passphrase.read_bytes())
    record = pooled_key(store, KeyState.ACTIVE)
    store.close()
    return credential, record


async def peer_serial(url: str, ca_file: Path) -> int:
    """The serial number of the certificate a new TLS connection to `url` is shown."""
    port = int(url.rsplit(":", 1)[1])
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ssl_context(ca_file),
                                              server_hostname="localhost")
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return x509.load_der_x509_certificate(der).serial_number
