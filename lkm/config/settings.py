"""The validated configuration: frozen settings, built once by lkm.config.load and read everywhere else.

Closed vocabularies are enums so a setting that parsed is one the code knows; secrets stay references.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from lkm.breaker import BreakerSettings
from lkm.config.secrets import SecretRef
from lkm.ratelimit import Rate
from lkm.roles import Role


class KeyStoreType(enum.StrEnum):
    FILE = "file"
    PKCS11 = "pkcs11"
    POSTGRESQL = "postgresql"


class ReplayCheck(enum.StrEnum):
    """Where a Hawk nonce is remembered: nowhere, in this server's memory, or in the key store's database (a
    request replayed to another replica is refused there too)."""

    OFF = "off"
    LOCAL = "local"
    CLUSTER = "cluster"


class RsaExecution(enum.StrEnum):
    """Where a private-key operation runs (limits.rsa_execution)."""

    AUTO = "auto"  # inline when the server runs one process per core on an in-process key store, else threads
    INLINE = "inline"  # on the event loop's own thread: no hand-off between threads
    THREADS = "threads"  # on worker threads (limits.worker_threads)


class PinWorkers(enum.StrEnum):
    """Whether each worker process keeps to a CPU of its own (limits.pin_workers)."""

    AUTO = "auto"  # when the server runs exactly one worker per CPU it may use
    OFF = "off"  # the kernel places every worker on any of those CPUs


class PlatformHttp(enum.StrEnum):
    """Which HTTP/1.1 implementation serves the platform listener (platform.http)."""

    LEAN = "lean"  # lkm's own protocol for the platform's few requests: least CPU per request
    AIOHTTP = "aiohttp"  # aiohttp's low-level server, as the other listeners


class LogLevel(enum.StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


class LogFormat(enum.StrEnum):
    JSON = "json"
    TEXT = "text"


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ListenSettings:
    """Where a listener binds and what it lets a connection cost (README: Connection limits)."""

    host: str
    port: int
    request_timeout_seconds: float = 5.0  # the whole request: TLS handshake, headers and body
    max_connections: int = 1000
    max_connections_per_client: int = 100
    allowed_networks: tuple[Network, ...] = ()  # empty: any address
    trusted_proxies: tuple[Network, ...] = ()  # peers whose X-Forwarded-For names the client


@dataclass(frozen=True)
class TLSSettings:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    key_password: SecretRef | None = None


@dataclass(frozen=True)
class HawkCredentialRef:
    id: str
    key: SecretRef


@dataclass(frozen=True)
class HawkSettings:
    credentials_file: Path | None
    credentials: tuple[HawkCredentialRef, ...]
    timestamp_skew_seconds: int
    replay_check: ReplayCheck
    nonce_cache_size: int


@dataclass(frozen=True)
class PlatformSettings:
    enabled: bool
    listen: ListenSettings
    tls: TLSSettings | None
    path: str
    public_host: str | None
    public_port: int | None
    hawk: HawkSettings
    allow_pkcs1: bool
    # RSA-PKCS1-V1_5 answers of this length only: a wrong padding or length answers a synthetic value (None: off)
    pkcs1_data_key_length: int | None = 32
    http: PlatformHttp = PlatformHttp.LEAN


@dataclass(frozen=True)
class ClientRule:
    name: str
    subject: str | None
    san: str | None
    fingerprint: str | None  # lowercase hex SHA-256 of the DER certificate
    roles: frozenset[Role]


@dataclass(frozen=True)
class NativeSettings:
    enabled: bool
    listen: ListenSettings
    tls: TLSSettings
    clients: tuple[ClientRule, ...]
    max_batch: int


@dataclass(frozen=True)
class OpsSettings:
    enabled: bool
    listen: ListenSettings


@dataclass(frozen=True)
class KeyStoreSettings:
    type: KeyStoreType
    path: Path | None = None
    passphrase: SecretRef | None = None  # file and postgresql: private keys are sealed under a key derived from it
    # postgresql
    dsn: SecretRef | None = None  # a libpq connection string (TLS to the database: sslmode, sslrootcert)
    pool_min: int = 1
    pool_max: int = 4
    connect_timeout: float = 5.0
    # pkcs11
    module: Path | None = None
    token_label: str | None = None
    token_serial: str | None = None
    pin: SecretRef | None = None
    pool_size: int = 2
    pkcs11_allow_pkcs1: bool = False
    pkcs11_allow_import: bool = True  # plaintext private keys may be imported into the token
    module_env: tuple[tuple[str, str], ...] = ()  # environment the PKCS#11 module reads (SOFTHSM2_CONF, ...)


@dataclass(frozen=True)
class AuditSettings:
    path: Path
    fail_closed: bool
    max_bytes: int
    keep_files: int


@dataclass(frozen=True)
class LoggingSettings:
    level: LogLevel
    format: LogFormat


DEFAULT_RATE = Rate(per_second=1000.0, burst=10_000)
DEFAULT_BREAKER = BreakerSettings()


@dataclass(frozen=True)
class LimitsSettings:
    max_body_bytes: int
    worker_threads: int
    request_deadline_ms: int
    keep_alive_seconds: int
    refresh_seconds: float
    rsa_execution: RsaExecution = RsaExecution.AUTO
    workers: int = 1  # server processes, each with its own event loop, all serving every listener
    pin_workers: PinWorkers = PinWorkers.AUTO
    rate: Rate = DEFAULT_RATE  # unwraps per caller per process (limits.rate_limits)
    rate_overrides: tuple[tuple[str, Rate], ...] = ()  # by Hawk id or client rule name
    breaker: BreakerSettings | None = DEFAULT_BREAKER  # None: off


@dataclass(frozen=True)
class RotationSettings:
    every_seconds: int  # scheduled rotation period; at least MIN_ROTATION_SECONDS


MIN_ROTATION_SECONDS = 3600


@dataclass(frozen=True)
class GenesysSettings:
    """Where and how to register new public keys with the platform (`POST /api/v2/recording/localkeys`)."""

    login_url: str  # e.g. https://login.mypurecloud.com
    api_url: str  # e.g. https://api.mypurecloud.com
    client_id: str
    client_secret: SecretRef
    config_id: str  # the key configuration (type LocalKeyManager) the keys belong to
    timeout_seconds: float
    max_attempts: int
    retry_initial_seconds: float
    retry_max_seconds: float


@dataclass(frozen=True)
class Settings:
    source: str
    keystore: KeyStoreSettings
    platform: PlatformSettings
    native: NativeSettings | None
    ops: OpsSettings
    audit: AuditSettings
    logging: LoggingSettings
    limits: LimitsSettings
    rotation: RotationSettings | None = None
    genesys: GenesysSettings | None = None
