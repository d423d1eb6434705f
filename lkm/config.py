"""YAML configuration, validated once into frozen settings.

This is the only module that reads the configuration file and secret files. Every error names the file, the
setting (as a dotted path) and what was expected; unknown settings are errors.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lkm.errors import ConfigError


class Role(enum.StrEnum):
    READ = "read"
    UNWRAP = "unwrap"
    ADMIN = "admin"


# --- settings -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SecretRef:
    """A secret named in the config by where it lives, never inline."""

    kind: str  # "file" | "env"
    name: str
    setting: str
    source: str

    def read_bytes(self) -> bytes:
        if self.kind == "env":
            value = os.environ.get(self.name)
            if value is None:
                raise ConfigError(self.source, self.setting, f"environment variable {self.name} to be set")
            return value.encode("utf-8")
        try:
            data = Path(self.name).read_bytes()
        except OSError as exc:
            raise ConfigError(self.source, self.setting,
                              f"a readable secret file at {self.name} ({exc.strerror})") from None
        return data.rstrip(b"\r\n")

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")


@dataclass(frozen=True)
class ListenSettings:
    host: str
    port: int


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
    replay_check: bool
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
    type: str  # "file" | "pkcs11" | "postgresql"
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
    level: str
    format: str  # "json" | "text"


@dataclass(frozen=True)
class LimitsSettings:
    max_body_bytes: int
    worker_threads: int
    request_deadline_ms: int
    keep_alive_seconds: int
    refresh_seconds: float


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


# --- reading ------------------------------------------------------------------------------------------------

T = TypeVar("T")
_MISSING: Any = object()
_DURATION_RE = re.compile(r"^(\d+)\s*(s|m|h|d)$")


def parse_duration(text: str) -> int:
    """'90s', '15m', '6h', '30d' -> seconds."""
    match = _DURATION_RE.match(text.strip())
    if not match:
        raise ValueError(text)
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


class Section:
    """One mapping of the YAML file; remembers what was read so that leftovers are reported as unknown."""

    def __init__(self, data: object, setting: str, source: str, base_dir: Path) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(source, setting or "(top level)", "a mapping of settings")
        self.data: dict[str, Any] = data
        self.setting = setting
        self.source = source
        self.base_dir = base_dir
        self._read: set[str] = set()

    def name(self, key: str) -> str:
        return f"{self.setting}.{key}" if self.setting else key

    def error(self, key: str, expected: str) -> ConfigError:
        return ConfigError(self.source, self.name(key), expected)

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        self._read.add(key)
        if key not in self.data or self.data[key] is None:
            if default is _MISSING:
                raise self.error(key, "a value (it is required)")
            return default
        return self.data[key]

    def string(self, key: str, default: Any = _MISSING, choices: tuple[str, ...] | None = None) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str) or not value:
            raise self.error(key, f"a non-empty string, got {value!r}")
        if choices and value not in choices:
            raise self.error(key, f"one of {', '.join(choices)}, got {value!r}")
        return value

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int | None = None,
            maximum: int | None = None) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"an integer >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"an integer <= {maximum}, got {value}")
        return value

    def number(self, key: str, default: Any = _MISSING, *, minimum: float = 0.0) -> Any:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"a number, got {value!r}")
        if value < minimum:
            raise self.error(key, f"a number >= {minimum}, got {value}")
        return float(value)

    def flag(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"true or false, got {value!r}")
        return value

    def duration(self, key: str, default: Any = _MISSING, *, minimum: int = 0) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        try:
            seconds = value if isinstance(value, int) and not isinstance(value, bool) else parse_duration(value)
        except (ValueError, AttributeError):
            raise self.error(key, f"a duration such as 90s, 15m, 6h or 30d, got {value!r}") from None
        if seconds < minimum:
            raise self.error(key, f"a duration of at least {minimum} seconds, got {value!r}")
        return seconds

    def path(self, key: str, default: Any = _MISSING) -> Any:
        value = self.string(key, default)
        if value is default and default is not _MISSING:
            return value
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else (self.base_dir / path)

    def existing_file(self, key: str, default: Any = _MISSING) -> Any:
        path = self.path(key, default)
        if path is default and default is not _MISSING:
            return path
        if not path.is_file():
            raise self.error(key, f"an existing file, but {path} does not exist")
        return path

    def secret(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, str):
            raise self.error(key, "a reference {file: PATH} or {env: NAME}, not an inline secret")
        sub = self.section(key)
        kinds = [k for k in ("file", "env") if sub.has(k)]
        if len(kinds) != 1:
            raise self.error(key, "exactly one of {file: PATH} or {env: NAME}")
        ref = SecretRef(kind=kinds[0], name=str(sub.path("file") if kinds[0] == "file" else sub.string("env")),
                        setting=self.name(key), source=self.source)
        sub.done()
        return ref

    def section(self, key: str, *, required: bool = False) -> Section:
        value = self.raw(key, _MISSING if required else {})
        return Section(value, self.name(key), self.source, self.base_dir)

    def items(self, key: str) -> list[Any]:
        value = self.raw(key, [])
        if not isinstance(value, list):
            raise self.error(key, f"a list, got {value!r}")
        return value

    def ignore_rest(self) -> None:
        self._read.update(self.data)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self._read)
        if unknown:
            raise self.error(unknown[0], "no such setting (unknown settings are not ignored; check spelling)")


def _listen(sec: Section, host: str, port: int) -> ListenSettings:
    listen = sec.section("listen")
    result = ListenSettings(host=listen.string("host", host),
                            port=listen.integer("port", port, minimum=0, maximum=65535))
    listen.done()
    return result


def _tls(sec: Section, *, client_ca: bool) -> TLSSettings:
    tls = sec.section("tls", required=True)
    result = TLSSettings(
        cert_file=tls.existing_file("cert_file"),
        key_file=tls.existing_file("key_file"),
        client_ca_file=tls.existing_file("client_ca_file") if client_ca else None,
        key_password=tls.secret("key_password", None),
    )
    tls.done()
    return result


def _keystore(sec: Section) -> KeyStoreSettings:
    kind = sec.string("type", "file", choices=("file", "pkcs11", "postgresql"))
    if kind == "file":
        result = KeyStoreSettings(type="file", path=sec.path("path"), passphrase=sec.secret("passphrase"))
    elif kind == "postgresql":
        pool_min = sec.integer("pool_min", 1, minimum=1, maximum=64)
        result = KeyStoreSettings(
            type="postgresql",
            dsn=sec.secret("dsn"),  # it usually holds a password
            passphrase=sec.secret("passphrase"),
            pool_min=pool_min,
            pool_max=sec.integer("pool_max", max(4, pool_min), minimum=pool_min, maximum=64),
            connect_timeout=sec.number("connect_timeout", 5.0, minimum=1.0),
        )
    else:
        if not (sec.has("token_label") or sec.has("token_serial")):
            raise sec.error("token_label", "token_label or token_serial to find the token (slot numbers change)")
        result = KeyStoreSettings(
            type="pkcs11",
            module=sec.existing_file("module"),
            token_label=sec.string("token_label", None),
            token_serial=sec.string("token_serial", None),
            pin=sec.secret("pin"),
            pool_size=sec.integer("pool_size", 2, minimum=1, maximum=64),
            pkcs11_allow_pkcs1=sec.flag("allow_pkcs1", False),
            pkcs11_allow_import=sec.flag("allow_import", True),
            module_env=_module_env(sec),
        )
    sec.done()
    return result


_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _module_env(sec: Section) -> tuple[tuple[str, str], ...]:
    env = sec.section("module_env")
    pairs = []
    for name in list(env.data):
        if not isinstance(name, str) or not _ENV_NAME_RE.match(name):
            raise env.error(str(name), "an environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
        pairs.append((name, str(env.path(name)) if name.endswith(("_CONF", "_PATH")) else env.string(name)))
    env.done()
    return tuple(pairs)


def _hawk(sec: Section) -> HawkSettings:
    creds = []
    for i, item in enumerate(sec.items("credentials")):
        entry = Section(item, sec.name(f"credentials[{i}]"), sec.source, sec.base_dir)
        creds.append(HawkCredentialRef(id=entry.string("id"), key=entry.secret("key")))
        entry.done()
    result = HawkSettings(
        credentials_file=sec.path("credentials_file", None),
        credentials=tuple(creds),
        timestamp_skew_seconds=sec.duration("timestamp_skew", 300, minimum=1),
        replay_check=sec.flag("replay_check", True),
        nonce_cache_size=sec.integer("nonce_cache_size", 100_000, minimum=100),
    )
    if result.timestamp_skew_seconds > 3600:
        # The window is also how long a captured request could be replayed to a server that forgot its nonce.
        raise sec.error("timestamp_skew", f"at most 1h, got {result.timestamp_skew_seconds} seconds")
    if result.credentials_file is None and not result.credentials:
        raise sec.error("credentials_file", "a Hawk credentials file (see `lkm hawk create`) or credentials")
    sec.done()
    return result


def _platform(sec: Section) -> PlatformSettings:
    enabled = sec.flag("enabled", True)
    if not enabled:
        # A native-only server: the rest of the section is kept for when the route is switched on again.
        sec.ignore_rest()
        return PlatformSettings(enabled=False, listen=ListenSettings("127.0.0.1", 8443), tls=None,
                                path="/key-management/v1/decrypt", public_host=None, public_port=None,
                                hawk=HawkSettings(credentials_file=None, credentials=(), timestamp_skew_seconds=300,
                                                  replay_check=True, nonce_cache_size=100_000),
                                allow_pkcs1=False)
    path = sec.string("path", "/key-management/v1/decrypt")
    if not path.startswith("/"):
        raise sec.error("path", f"an absolute URL path starting with '/', got {path!r}")
    result = PlatformSettings(
        enabled=enabled,
        listen=_listen(sec, "0.0.0.0", 8443),  # noqa: S104 - the platform calls from outside
        tls=_tls(sec, client_ca=False) if sec.has("tls") else None,
        path=path,
        public_host=sec.string("public_host", None),
        public_port=sec.integer("public_port", None, minimum=1, maximum=65535),
        hawk=_hawk(sec.section("hawk", required=True)),
        allow_pkcs1=sec.flag("allow_pkcs1", True),
    )
    if result.tls is None and not sec.flag("insecure_plaintext", False):
        raise sec.error("tls", "a tls section with cert_file and key_file (the platform only calls https)")
    sec.done()
    return result


_FINGERPRINT_RE = re.compile(r"^(sha256:)?([0-9a-fA-F:]{64,95})$")


def _client(item: object, setting: str, source: str, base_dir: Path) -> ClientRule:
    sec = Section(item, setting, source, base_dir)
    fingerprint = sec.string("fingerprint", None)
    if fingerprint is not None:
        match = _FINGERPRINT_RE.match(fingerprint.strip())
        digits = match.group(2).replace(":", "").lower() if match else ""
        if len(digits) != 64:
            raise sec.error("fingerprint", "a SHA-256 fingerprint: 64 hex digits, colons allowed")
        fingerprint = digits
    roles = sec.items("roles")
    try:
        role_set = frozenset(Role(r) for r in roles)
    except ValueError:
        raise sec.error("roles", f"roles from {', '.join(r.value for r in Role)}, got {roles!r}") from None
    rule = ClientRule(name=sec.string("name"), subject=sec.string("subject", None), san=sec.string("san", None),
                      fingerprint=fingerprint, roles=role_set)
    if rule.subject is not None:
        from cryptography import x509  # noqa: PLC0415

        try:
            x509.Name.from_rfc4514_string(rule.subject)
        except ValueError:
            raise sec.error("subject", f"an RFC 4514 distinguished name such as 'CN=app,O=Example', "
                                       f"got {rule.subject!r}") from None
    if not (rule.subject or rule.san or rule.fingerprint):
        raise sec.error("subject", "at least one of subject, san or fingerprint to identify the client")
    sec.done()
    return rule


def _native(sec: Section) -> NativeSettings | None:
    if not sec.flag("enabled", True):
        sec.ignore_rest()  # a switched-off listener keeps its settings for when it is switched on again
        return None
    clients = tuple(_client(item, sec.name(f"clients[{i}]"), sec.source, sec.base_dir)
                    for i, item in enumerate(sec.items("clients")))
    result = NativeSettings(enabled=True, listen=_listen(sec, "0.0.0.0", 8444),  # noqa: S104
                            tls=_tls(sec, client_ca=True), clients=clients,
                            max_batch=sec.integer("max_batch", 100, minimum=1, maximum=10_000))
    sec.done()
    return result


def _seconds(sec: Section, key: str, default: float, *, minimum: float) -> float:
    """A duration that may be below a second (timeouts, retry delays): 0.5, 10, '10s', '5m'."""
    value = sec.raw(key, default)
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        try:
            seconds = float(parse_duration(str(value)))
        except ValueError:
            raise sec.error(key, f"a number of seconds or a duration such as 10s or 5m, got {value!r}") from None
    if seconds < minimum:
        raise sec.error(key, f"at least {minimum} seconds, got {value!r}")
    return seconds


def _rotation(sec: Section) -> RotationSettings:
    result = RotationSettings(every_seconds=sec.duration("every", minimum=MIN_ROTATION_SECONDS))
    sec.done()
    return result


_REGION_RE = re.compile(r"^[a-z0-9-]+(\.[a-z0-9-]+)+$")


def _base_url(sec: Section, key: str) -> str:
    value: str = sec.string(key).rstrip("/")
    match = re.match(r"^(https?)://([^/\s:]+|\[[0-9a-fA-F:]+\])(:\d+)?$", value)
    if not match:
        raise sec.error(key, f"a base URL such as https://api.mypurecloud.com (no path), got {value!r}")
    # The client secret and bearer tokens travel here: plain http only to a stand-in on this machine.
    if match.group(1) == "http" and match.group(2) not in ("127.0.0.1", "localhost", "[::1]"):
        raise sec.error(key, f"an https:// URL (http only for a loopback test platform), got {value!r}")
    return value


def _genesys(sec: Section) -> GenesysSettings:
    if sec.has("region"):
        if sec.has("login_url") or sec.has("api_url"):
            raise sec.error("region", "either region or login_url and api_url, not both")
        region = sec.string("region").strip().lower()
        if not _REGION_RE.match(region):
            raise sec.error("region", f"a region domain such as mypurecloud.com or usw2.pure.cloud, got {region!r}")
        login_url, api_url = f"https://login.{region}", f"https://api.{region}"
    elif sec.has("login_url") and sec.has("api_url"):
        login_url, api_url = _base_url(sec, "login_url"), _base_url(sec, "api_url")
    else:
        raise sec.error("region", "a region (e.g. mypurecloud.com), or both login_url and api_url")
    initial = _seconds(sec, "retry_initial", 2.0, minimum=0.01)
    result = GenesysSettings(
        login_url=login_url,
        api_url=api_url,
        client_id=sec.string("client_id"),
        client_secret=sec.secret("client_secret"),
        config_id=sec.string("config_id"),
        timeout_seconds=_seconds(sec, "timeout", 15.0, minimum=0.1),
        max_attempts=sec.integer("max_attempts", 6, minimum=1, maximum=100),
        retry_initial_seconds=initial,
        retry_max_seconds=max(initial, _seconds(sec, "retry_max", 300.0, minimum=0.01)),
    )
    sec.done()
    return result


def load_settings(path: str | os.PathLike[str]) -> Settings:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, "(file)", f"a readable YAML file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(source, "(file)", f"valid YAML{where}") from None
    return settings_from_mapping(data, source=source, base_dir=Path(path).resolve().parent)


def settings_from_mapping(data: object, *, source: str, base_dir: Path) -> Settings:
    top = Section(data, "", source, base_dir)
    keystore = _keystore(top.section("keystore", required=True))
    platform = _platform(top.section("platform", required=True))
    native = _native(top.section("native"))
    ops_sec = top.section("ops")
    ops = OpsSettings(enabled=ops_sec.flag("enabled", True), listen=_listen(ops_sec, "127.0.0.1", 9090))
    ops_sec.done()
    audit_sec = top.section("audit")
    audit = AuditSettings(
        path=audit_sec.path("path", base_dir / "audit.log"),
        fail_closed=audit_sec.flag("fail_closed", True),
        max_bytes=audit_sec.integer("max_bytes", 100 * 1024 * 1024, minimum=4096),
        keep_files=audit_sec.integer("keep_files", 0, minimum=0),
    )
    audit_sec.done()
    log_sec = top.section("logging")
    logging_settings = LoggingSettings(
        level=log_sec.string("level", "info", choices=("debug", "info", "warning", "error")),
        format=log_sec.string("format", "json", choices=("json", "text")),
    )
    log_sec.done()
    lim = top.section("limits")
    threads = os.cpu_count() or 2
    if keystore.type == "pkcs11":
        # A worker thread waits on one HSM session for each operation: fewer threads than sessions would leave
        # sessions (and a network HSM's capacity) idle, whatever the host's cores.
        threads = max(threads, keystore.pool_size)
    limits = LimitsSettings(
        max_body_bytes=lim.integer("max_body_bytes", 64 * 1024, minimum=1024, maximum=16 * 1024 * 1024),
        worker_threads=lim.integer("worker_threads", threads, minimum=1, maximum=256),
        request_deadline_ms=lim.integer("request_deadline_ms", 250, minimum=10),
        keep_alive_seconds=lim.integer("keep_alive_seconds", 75, minimum=1),
        refresh_seconds=lim.number("refresh_seconds", 2.0, minimum=0.1),
    )
    lim.done()
    rotation = _rotation(top.section("rotation")) if top.has("rotation") else None
    genesys = _genesys(top.section("genesys")) if top.has("genesys") else None
    top.done()
    return Settings(source=source, keystore=keystore, platform=platform, native=native, ops=ops,
                    audit=audit, logging=logging_settings, limits=limits, rotation=rotation,
                    genesys=genesys)

