"""Shared fixtures: a real lkm server over real TLS.

What is immutable is made once per session: the certificates (`certs`; a test that changes cert files takes
`own_certs`, a private copy) and a pool of real RSA-3072 keys (`key_pool`), which `Running.create_key` imports
into a file store instead of generating a key per call. Everything a test changes (key store, audit log,
config, HSM token) stays per test. `clock` is a fake clock for code that takes a clock parameter.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import fcntl
import functools
import inspect
import itertools
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from lkm import fsutil, pki
from lkm.client import NativeClient, PlatformClient, client_ssl_context
from lkm.config import load_settings
from lkm.hawk import HawkCredential
from lkm.hawk_credentials import load_credentials_file, mint_credential
from lkm.idleloop import IdleAwareLoop
from lkm.keys import KeyRecord, KeyState, generate_private_key, load_private_key_any, load_public_pkcs1, new_key_id
from lkm.keystore.file import FileKeyStore
from lkm.server import LkmServer

# Shared with every test module from here, once: a module that imported them again would get its own
# session-scoped instances (a second SoftHSM2 directory exported as SOFTHSM2_CONF under the first one's tokens,
# a second PostgreSQL cluster).
from tests.hsm import module_token, pkcs11_store, softhsm_conf, softhsm_token  # noqa: F401 - shared fixtures
from tests.pg import pg_cluster, pg_dsn  # noqa: F401 - shared fixtures

VECTORS = json.loads((Path(__file__).parent / "vectors" / "genesys-sample.json").read_text()) \
    if (Path(__file__).parent / "vectors" / "genesys-sample.json").exists() else {"vectors": []}


@functools.cache
def vector_key(which: int | str) -> rsa.RSAPrivateKey:
    """The private key of a platform sample vector (by index or name), read once per test process: reading a
    foreign key runs the full RSA consistency check, 0.1 s of CPU, which the tests of key import pay and the
    tests that only need the vector's key need not."""
    vectors = VECTORS["vectors"]
    vector = vectors[which] if isinstance(which, int) else next(v for v in vectors if v["name"] == which)
    return load_private_key_any(vector["private_key_pkcs1_der_b64"].encode())


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

    def copy_to(self, directory: Path) -> Pki:
        """The same certificates in another directory, for a test that changes or removes cert files."""
        shutil.copytree(self.dir, directory)
        files = {name: (directory / cert.name, directory / key.name) for name, (cert, key) in self.files.items()}
        return Pki(directory, self.ca, files)


class KeyPool:
    """Real RSA-3072 keys, each generated once per session and handed out in turn.

    Generating a key costs 0.1-1 s; a test that only needs *a* key imports one of these instead. Any `size`
    consecutive takes are distinct keys, so one test never sees the same key twice unless it takes more than
    `size`. Keys are made on first demand, so a run that needs two keys pays for two. With `share(directory)`,
    the test processes of one run (pytest-xdist workers) share the keys through that directory: the first to
    need key N generates it and writes it there, the others read it instead of generating their own.
    """

    def __init__(self, size: int = 12, factory: Callable[[], rsa.RSAPrivateKey] = generate_private_key) -> None:
        self._keys: list[rsa.RSAPrivateKey] = []
        self._size = size
        self._factory = factory
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._directory: Path | None = None

    def share(self, directory: Path) -> None:
        """Keys from now on come from, or go to, `directory` (created if missing), shared with other processes."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._directory = directory

    def take(self) -> rsa.RSAPrivateKey:
        index = next(self._turn) % self._size
        with self._lock:  # threads of one test may take at once; each key is still made only once
            while len(self._keys) <= index:
                self._keys.append(self._make(len(self._keys)))
            return self._keys[index]

    def _make(self, index: int) -> rsa.RSAPrivateKey:
        if self._directory is None:
            return self._factory()
        with open(self._directory / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process generates key N; the others wait and read it
            path = self._directory / f"key-{index:02d}.pem"
            if path.exists():
                # Generated by another process of this run: no RSA consistency check (0.1 s a key) on reading it.
                loaded = serialization.load_pem_private_key(path.read_bytes(), password=None,
                                                            unsafe_skip_rsa_key_validation=True)
                assert isinstance(loaded, rsa.RSAPrivateKey)
                return loaded
            key = self._factory()
            fsutil.atomic_create(path, key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
            return key


KEY_POOL = KeyPool()


def pooled_key(store: Any, state: KeyState = KeyState.ACTIVE, label: str = "") -> KeyRecord:
    """A key in `store` for a test that needs one but does not test generation: a pooled key imported under a
    new id, written by the same path as a generated one, without generating (0.1-1 s of CPU)."""
    record: KeyRecord = store.import_key(new_key_id(), KEY_POOL.take(), state=state, label=label)
    return record


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


PASSPHRASE = "correct horse battery staple"


# The scrypt cost of the stores the test servers use: every server start and CLI call derives the master key,
# 80 ms at the production cost. A test that makes a store itself passes scrypt_n=TEST_SCRYPT_N (the file store,
# PostgresKeyStore; tests.pg.seed_pg_store for a database servers then open) unless it is about the KDF or the
# production cost: test_sealing, the wrong-passphrase tests, and the stores made from settings or by dev mode.
TEST_SCRYPT_N = 2**10


@functools.cache
def keystore_header() -> bytes:
    """The header (salt, scrypt parameters, sealed check value) of a file store with the tests' passphrase and
    TEST_SCRYPT_N, made once by the real FileKeyStore."""
    with tempfile.TemporaryDirectory() as directory:
        FileKeyStore(Path(directory) / "ks", PASSPHRASE.encode(), scrypt_n=TEST_SCRYPT_N).close()
        return (Path(directory) / "ks" / "keystore.json").read_bytes()


def seed_keystore(directory: Path) -> None:
    """An empty file store at `directory` with the tests' passphrase, unless one is there already."""
    fsutil.ensure_private_dir(directory)
    fsutil.ensure_private_dir(directory / "keys")
    header = directory / "keystore.json"
    if not header.exists():
        fsutil.atomic_create(header, keystore_header())


def base_config(tmp: Path, certs: Pki, **overrides: Any) -> dict[str, Any]:
    (tmp / "keystore.pass").write_text(PASSPHRASE + "\n")
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
        # One worker process: a server a test starts as a process needs no second one unless the test is about
        # workers (those set limits.workers), and each worker costs an interpreter start and a store opened.
        "limits": {"refresh_seconds": 0.2, "workers": 1},
    }
    for dotted, value in overrides.items():
        target = config
        parts = dotted.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    keystore = config["keystore"]
    if keystore.get("type") == "file" and keystore.get("passphrase") == {"file": str(tmp / "keystore.pass")}:
        seed_keystore(tmp / keystore["path"])  # relative paths are relative to the config file
    return config


def write_config(tmp: Path, config: dict[str, Any]) -> Path:
    path = tmp / "lkm.yaml"
    # libyaml's emitter when there (the same safe YAML, a quarter of the time): one config per server a test starts.
    path.write_text(yaml.dump(config, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper)))
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

    def create_key(self, state: KeyState = KeyState.ACTIVE, *, fresh: bool = False) -> KeyRecord:
        """A new key in the server's store: a pooled key imported under a new id, which serves exactly as a
        generated one (on an HSM, generating costs seconds); `fresh=True` generates it in the store."""
        store = self.server.store
        assert store is not None
        record: KeyRecord
        if fresh:
            record = store.create_key(state=state)
        else:
            record = store.import_key(new_key_id(), KEY_POOL.take(), state=state)
        return record

    def audit_lines(self) -> list[dict[str, Any]]:
        path = Path(self.server.settings.audit.path)
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def eventually(check: Callable[[], Any], within: float = 15.0) -> Any:
    """Polls `check` (a function or a coroutine function) until it returns something true or `within` seconds
    pass; returns its last result."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.05)


def run_on_idle_aware_loop(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Runs `scenario` on the event loop the server runs on, which can say when it is idle (pytest-aiohttp's
    loops cannot: what the server does with that signal is tested on this one)."""
    with asyncio.Runner(loop_factory=IdleAwareLoop) as runner:
        runner.run(scenario())


def wrap(record: KeyRecord, secret: bytes, pad: padding.AsymmetricPadding = OAEP_SHA1) -> bytes:
    return load_public_pkcs1(record.public_key_der).encrypt(secret, pad)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The session's certificates; read-only (a test that changes cert files uses `own_certs`)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def own_certs(certs: Pki, tmp_path: Path) -> Pki:
    """A private copy of the session's certificates, free to change."""
    return certs.copy_to(tmp_path / "pki")


@pytest.fixture(scope="session", autouse=True)
def key_pool(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> KeyPool:
    """Pre-made RSA-3072 private keys for tests that need a key but not a freshly generated one, shared by the
    run's worker processes (their base temporary directories have one parent for the run)."""
    base = tmp_path_factory.getbasetemp()
    KEY_POOL.share((base.parent if worker_id != "master" else base) / "key-pool")
    return KEY_POOL


@dataclass
class FakeClock:
    """A clock that moves only when the test says so, for code that takes a clock parameter.

    Pass the reading the code expects: `monotonic` (seconds, for time.monotonic/perf_counter), `time` (epoch
    seconds, for time.time) or `now` (an aware UTC datetime, for keys.utcnow).
    """

    start: dt.datetime = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    elapsed: float = 0.0

    def monotonic(self) -> float:
        return self.elapsed

    def time(self) -> float:
        return self.start.timestamp() + self.elapsed

    def now(self) -> dt.datetime:
        return self.start + dt.timedelta(seconds=self.elapsed)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self.elapsed += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


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
            next(iter(load_credentials_file(hawk_file).values()))
        self.server = LkmServer(settings)
        await self.server.start()
        self.session = aiohttp.ClientSession()
        return Running(self.server, self.session, self.certs, self.config_path, credential, self.tmp)

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()
        await self.server.stop()



def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test on a SoftHSM2 token is marked `hsm` and `slow` (it spawns HSM worker processes and generates keys
    on the token), and every test on the throwaway PostgreSQL cluster `slow` (a database per test): the inner loop
    (`tests/run -m "not slow"`) leaves them out.

    Tests marked `long` run first, spread over the parallel workers: pytest-xdist's `worksteal` (pyproject.toml)
    first hands each worker one contiguous share of this order, and a worker that runs out takes the second half
    of the longest queue left; each share begins with its part of the long tests, so that no worker starts with
    most of them (under `load`, one worker kept a quarter of the run's tests, long ones among them, and ended
    the run 16 s after the others)."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "softhsm_conf" in fixtures:
            item.add_marker(pytest.mark.hsm)
            item.add_marker(pytest.mark.slow)
        if "pg_cluster" in fixtures or "pg_dsn" in fixtures:
            item.add_marker(pytest.mark.slow)
    long = [item for item in items if item.get_closest_marker("long") is not None]
    rest = [item for item in items if item.get_closest_marker("long") is None]
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    # The longest first, each to the worker with the fewest seconds so far (`long(seconds)`: about how long).
    firsts_of: list[list[pytest.Item]] = [[] for _ in range(workers)]
    loads = [0.0] * workers
    for item in sorted(long, key=_long_seconds, reverse=True):
        least = loads.index(min(loads))
        firsts_of[least].append(item)
        loads[least] += _long_seconds(item)
    ordered: list[pytest.Item] = []
    left = len(items)
    for worker in range(workers):
        share = left // (workers - worker)  # worksteal's first split: equal contiguous shares, in worker order
        left -= share
        firsts = firsts_of[worker]
        others = max(0, share - len(firsts))
        ordered += firsts + rest[:others]
        rest = rest[others:]
    items[:] = ordered + rest


def _long_seconds(item: pytest.Item) -> float:
    marker = item.get_closest_marker("long")
    return float(marker.args[0]) if marker is not None and marker.args else 5.0
