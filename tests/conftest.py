"""Shared fixtures: a real lkm server over real TLS, with certificates made for each test."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from lkm import pki
from lkm.client import NativeClient, PlatformClient, client_ssl_context
from lkm.config import load_settings
from lkm.hawk import HawkCredential, mint_credential
from lkm.keys import KeyRecord, KeyState, load_public_pkcs1
from lkm.server import LkmServer
from tests.hsm import module_token, pkcs11_store, softhsm_conf, softhsm_token  # noqa: F401 - shared fixtures

VECTORS = json.loads((Path(__file__).parent / "vectors" / "genesys-sample.json").read_text()) \
    if (Path(__file__).parent / "vectors" / "genesys-sample.json").exists() else {"vectors": []}

OAEP_SHA1 = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
OAEP_SHA256 = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
PKCS1 = padding.PKCS1v15()

ROLES = {"admin": ["read", "unwrap", "admin"], "unwrapper": ["read", "unwrap"], "reader": ["read"]}


@dataclass
class Pki:
    dir: Path
    ca: pki.Issued
    files: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    def client(self, name: str) -> tuple[Path, Path]:
        return self.files[name]


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = pki.make_ca("test CA")
    ca.write(directory / "ca.pem", directory / "ca-key.pem")
    env = Pki(directory, ca)
    server = pki.issue(ca, "localhost", server=True, dns=("localhost",), ips=("127.0.0.1",))
    server.write(directory / "server.pem", directory / "server-key.pem")
    env.files["server"] = (directory / "server.pem", directory / "server-key.pem")
    for name in [*ROLES, "unlisted"]:
        issued = pki.issue(ca, f"client-{name}", server=False)
        issued.write(directory / f"{name}.pem", directory / f"{name}-key.pem")
        env.files[name] = (directory / f"{name}.pem", directory / f"{name}-key.pem")
    now = dt.datetime.now(dt.UTC)
    expired = pki.issue(ca, "client-admin", server=False, not_before=now - dt.timedelta(days=30),
                        not_after=now - dt.timedelta(days=1))
    expired.write(directory / "expired.pem", directory / "expired-key.pem")
    env.files["expired"] = (directory / "expired.pem", directory / "expired-key.pem")
    other_ca = pki.make_ca("other CA")
    stranger = pki.issue(other_ca, "client-admin", server=False)
    stranger.write(directory / "other-ca.pem", directory / "other-ca-key.pem")
    env.files["other_ca"] = (directory / "other-ca.pem", directory / "other-ca-key.pem")
    return env


def base_config(tmp: Path, certs: Pki, **overrides: Any) -> dict[str, Any]:
    (tmp / "keystore.pass").write_text("correct horse battery staple\n")
    os.chmod(tmp / "keystore.pass", 0o600)
    config: dict[str, Any] = {
        "keystore": {"type": "file", "path": str(tmp / "keys"), "passphrase": {"file": str(tmp / "keystore.pass")}},
        "platform": {
            "listen": {"host": "127.0.0.1", "port": 0},
            "tls": {"cert_file": str(certs.dir / "server.pem"), "key_file": str(certs.dir / "server-key.pem")},
            "hawk": {"credentials_file": str(tmp / "hawk.json")},
        },
        "native": {
            "listen": {"host": "127.0.0.1", "port": 0},
            "tls": {"cert_file": str(certs.dir / "server.pem"), "key_file": str(certs.dir / "server-key.pem"),
                    "client_ca_file": str(certs.ca_file)},
            "clients": [{"name": role, "subject": f"CN=client-{role},O=lkm", "roles": roles}
                        for role, roles in ROLES.items()],
        },
        "ops": {"listen": {"host": "127.0.0.1", "port": 0}},
        "audit": {"path": str(tmp / "audit" / "audit.log")},
        "logging": {"level": "warning", "format": "json"},
        "limits": {"refresh_seconds": 0.2},
    }
    for dotted, value in overrides.items():
        target = config
        parts = dotted.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    return config


def write_config(tmp: Path, config: dict[str, Any]) -> Path:
    path = tmp / "lkm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Running:
    """A started server plus everything a test needs to call it."""

    server: LkmServer
    session: aiohttp.ClientSession
    certs: Pki
    config_path: Path
    hawk: HawkCredential
    tmp: Path

    @property
    def store(self) -> Any:
        return self.server.store

    def url(self, listener: str) -> str:
        return self.server.url(listener)

    def platform(self, credential: HawkCredential | None = None) -> PlatformClient:
        return PlatformClient(self.session, self.url("platform") + "/key-management/v1/decrypt",
                              credential or self.hawk, client_ssl_context(self.certs.ca_file))

    def native(self, who: str = "admin") -> NativeClient:
        cert, key = self.certs.client(who)
        return NativeClient(self.session, self.url("native"), client_ssl_context(self.certs.ca_file, cert, key))

    def create_key(self, state: KeyState = KeyState.ACTIVE) -> KeyRecord:
        record: KeyRecord = self.server.store.create_key(state=state)
        return record

    def audit_lines(self) -> list[dict[str, Any]]:
        path = Path(self.server.settings.audit.path)
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def eventually(check: Callable[[], Any], within: float = 15.0) -> Any:
    """Polls `check` until it returns something true or `within` seconds pass; returns its last result."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.05)


def wrap(record: KeyRecord, secret: bytes, pad: padding.AsymmetricPadding = OAEP_SHA1) -> bytes:
    return load_public_pkcs1(record.public_key_der).encrypt(secret, pad)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def certs(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def config_factory(tmp_path: Path, certs: Pki) -> Callable[..., Path]:
    def factory(**overrides: Any) -> Path:
        return write_config(tmp_path, base_config(tmp_path, certs, **overrides))

    return factory


@pytest.fixture
async def running(tmp_path: Path, certs: Pki, config_factory: Callable[..., Path]) -> AsyncIterator[Running]:
    async with start_server(tmp_path, certs, config_factory()) as handle:
        yield handle


class start_server:
    def __init__(self, tmp: Path, certs: Pki, config_path: Path) -> None:
        self.tmp, self.certs, self.config_path = tmp, certs, config_path

    async def __aenter__(self) -> Running:
        settings = load_settings(self.config_path)
        hawk_file = settings.platform.hawk.credentials_file
        assert hawk_file is not None
        credential = mint_credential(hawk_file, "platform-test") if not hawk_file.exists() else \
            next(iter(__import__("lkm.hawk").hawk.load_credentials_file(hawk_file).values()))
        self.server = LkmServer(settings)
        await self.server.start()
        self.session = aiohttp.ClientSession()
        return Running(self.server, self.session, self.certs, self.config_path, credential, self.tmp)

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()
        await self.server.stop()

