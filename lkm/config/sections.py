"""One parser per section of the configuration file: YAML mapping in, frozen settings out.

Defaults and cross-setting rules live here, each once; every parser ends with `done()` so that a misspelt
setting is refused rather than silently ignored.
"""

from __future__ import annotations

import ipaddress
import os
import re
from typing import Any

from cryptography import x509

from lkm.breaker import BreakerAction, BreakerSettings
from lkm.config import settings
from lkm.config.reader import Section
from lkm.ratelimit import Rate
from lkm.roles import Role

PLATFORM_PATH = "/key-management/v1/decrypt"
HAWK_SKEW_SECONDS = 300
NONCE_CACHE_SIZE = 100_000
PKCS1_DATA_KEY_BYTES = 32  # the platform's data keys are AES-256; also the most an HMAC-SHA256 answer holds

_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FINGERPRINT_RE = re.compile(r"^(sha256:)?([0-9a-fA-F:]{64,95})$")
_REGION_RE = re.compile(r"^[a-z0-9-]+(\.[a-z0-9-]+)+$")
_BASE_URL_RE = re.compile(r"^(https?)://([^/\s:]+|\[[0-9a-fA-F:]+\])(:\d+)?$")


def read_listen(sec: Section, host: str, port: int) -> settings.ListenSettings:
    listen = sec.section("listen")
    defaults = settings.ListenSettings(host, port)
    max_connections = listen.integer("max_connections", defaults.max_connections, minimum=1)
    result = settings.ListenSettings(
        host=listen.string("host", host),
        port=listen.integer("port", port, minimum=0, maximum=65535),
        request_timeout_seconds=listen.seconds("request_timeout", defaults.request_timeout_seconds, minimum=0.1),
        max_connections=max_connections,
        max_connections_per_client=listen.integer("max_connections_per_client",
                                                  min(defaults.max_connections_per_client, max_connections),
                                                  minimum=1, maximum=max_connections),
        allowed_networks=_networks(listen, "allowed_networks"),
        trusted_proxies=_networks(listen, "trusted_proxies"),
    )
    listen.done()
    return result


def _networks(sec: Section, key: str) -> tuple[settings.Network, ...]:
    networks = []
    for item in sec.items(key):
        try:
            networks.append(ipaddress.ip_network(str(item), strict=True))
        except ValueError:
            raise sec.error(key, f"a list of networks in CIDR form such as 192.0.2.0/24, got {item!r}") from None
    return tuple(networks)


def read_tls(sec: Section, *, client_ca: bool) -> settings.TLSSettings:
    tls = sec.section("tls", required=True)
    result = settings.TLSSettings(
        cert_file=tls.existing_file("cert_file"),
        key_file=tls.existing_file("key_file"),
        client_ca_file=tls.existing_file("client_ca_file") if client_ca else None,
        key_password=tls.secret("key_password", None),
    )
    tls.done()
    return result


def read_keystore(sec: Section) -> settings.KeyStoreSettings:
    kind = sec.choice("type", settings.KeyStoreType, settings.KeyStoreType.FILE)
    if kind is settings.KeyStoreType.FILE:
        result = settings.KeyStoreSettings(type=kind, path=sec.path("path"), passphrase=sec.secret("passphrase"))
    elif kind is settings.KeyStoreType.POSTGRESQL:
        pool_min = sec.integer("pool_min", 1, minimum=1, maximum=64)
        result = settings.KeyStoreSettings(
            type=kind,
            dsn=sec.secret("dsn"),  # it usually holds a password
            passphrase=sec.secret("passphrase"),
            pool_min=pool_min,
            pool_max=sec.integer("pool_max", max(4, pool_min), minimum=pool_min, maximum=64),
            connect_timeout=sec.number("connect_timeout", 5.0, minimum=1.0),
        )
    else:
        if not (sec.has("token_label") or sec.has("token_serial")):
            raise sec.error("token_label", "token_label or token_serial to find the token (slot numbers change)")
        result = settings.KeyStoreSettings(
            type=kind,
            module=sec.existing_file("module"),
            token_label=sec.string("token_label", None),
            token_serial=sec.string("token_serial", None),
            pin=sec.secret("pin"),
            pool_size=sec.integer("pool_size", 2, minimum=1, maximum=64),
            pkcs11_allow_pkcs1=sec.flag("allow_pkcs1", False),
            pkcs11_allow_import=sec.flag("allow_import", True),
            module_env=_module_env(sec.section("module_env")),
        )
    sec.done()
    return result


def _module_env(env: Section) -> tuple[tuple[str, str], ...]:
    pairs = []
    for name in env.keys_as_written():
        if not isinstance(name, str) or not _ENV_NAME_RE.match(name):
            raise env.error(str(name), "an environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
        pairs.append((name, str(env.path(name)) if name.endswith(("_CONF", "_PATH")) else env.string(name)))
    env.done()
    return tuple(pairs)


def _replay_check(sec: Section) -> settings.ReplayCheck:
    """local (default) or cluster; true and false, the older forms, mean local and off."""
    check = settings.ReplayCheck
    return sec.choice("replay_check", check, check.LOCAL, booleans=(check.LOCAL, check.OFF))


def read_hawk(sec: Section, keystore: settings.KeyStoreSettings) -> settings.HawkSettings:
    creds = []
    for entry in sec.entries("credentials"):
        creds.append(settings.HawkCredentialRef(id=entry.string("id"), key=entry.secret("key")))
        entry.done()
    result = settings.HawkSettings(
        credentials_file=sec.path("credentials_file", None),
        credentials=tuple(creds),
        timestamp_skew_seconds=sec.duration("timestamp_skew", HAWK_SKEW_SECONDS, minimum=1),
        replay_check=_replay_check(sec),
        nonce_cache_size=sec.integer("nonce_cache_size", NONCE_CACHE_SIZE, minimum=100),
    )
    if result.timestamp_skew_seconds > 3600:
        # The window is also how long a captured request could be replayed to a server that forgot its nonce.
        raise sec.error("timestamp_skew", f"at most 1h, got {result.timestamp_skew_seconds} seconds")
    shared = keystore.type is settings.KeyStoreType.POSTGRESQL  # `lkm hawk create` writes to the database
    if result.credentials_file is None and not result.credentials and not shared:
        raise sec.error("credentials_file", "a Hawk credentials file (see `lkm hawk create`) or credentials")
    if result.replay_check is settings.ReplayCheck.CLUSTER and not shared:
        raise sec.error("replay_check", "local or off: cluster needs keystore.type postgresql (the nonces are "
                                        "kept in its database)")
    sec.done()
    return result


def read_platform(sec: Section, keystore: settings.KeyStoreSettings) -> settings.PlatformSettings:
    if not sec.flag("enabled", True):
        # A native-only server: the rest of the section is kept for when the route is switched on again.
        sec.ignore_rest()
        hawk = settings.HawkSettings(credentials_file=None, credentials=(), timestamp_skew_seconds=HAWK_SKEW_SECONDS,
                                     replay_check=settings.ReplayCheck.LOCAL,
                                     nonce_cache_size=NONCE_CACHE_SIZE)
        return settings.PlatformSettings(enabled=False, listen=settings.ListenSettings("127.0.0.1", 8443), tls=None,
                                         path=PLATFORM_PATH, public_host=None, public_port=None, hawk=hawk,
                                         allow_pkcs1=False)
    path = sec.string("path", PLATFORM_PATH)
    if not path.startswith("/"):
        raise sec.error("path", f"an absolute URL path starting with '/', got {path!r}")
    result = settings.PlatformSettings(
        enabled=True,
        listen=read_listen(sec, "0.0.0.0", 8443),  # noqa: S104 - the platform calls from outside
        tls=read_tls(sec, client_ca=False) if sec.has("tls") else None,
        path=path,
        public_host=sec.string("public_host", None),
        public_port=sec.integer("public_port", None, minimum=1, maximum=65535),
        hawk=read_hawk(sec.section("hawk", required=True), keystore),
        allow_pkcs1=sec.flag("allow_pkcs1", True),
        pkcs1_data_key_length=_pkcs1_length(sec),
        http=sec.choice("http", settings.PlatformHttp, settings.PlatformHttp.LEAN),
    )
    if result.tls is None and not sec.flag("insecure_plaintext", False):
        raise sec.error("tls", "a tls section with cert_file and key_file (the platform only calls https)")
    sec.done()
    return result


def _pkcs1_length(sec: Section) -> int | None:
    """32 (the platform's data keys) unless set; `off` (or false) answers PKCS#1 plaintexts of any length."""
    if not sec.has("pkcs1_data_key_length"):
        return PKCS1_DATA_KEY_BYTES
    value = sec.raw("pkcs1_data_key_length")
    if value is False or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    return sec.integer("pkcs1_data_key_length", minimum=1, maximum=PKCS1_DATA_KEY_BYTES)


def read_client(sec: Section) -> settings.ClientRule:
    fingerprint = sec.string("fingerprint", None)
    if fingerprint is not None:
        match = _FINGERPRINT_RE.match(fingerprint.strip())
        digits = match.group(2).replace(":", "").lower() if match else ""
        if len(digits) != 64:
            raise sec.error("fingerprint", "a SHA-256 fingerprint: 64 hex digits, colons allowed")
        fingerprint = digits
    roles = sec.members("roles", Role)
    rule = settings.ClientRule(name=sec.string("name"), subject=sec.string("subject", None),
                               san=sec.string("san", None), fingerprint=fingerprint, roles=roles)
    if rule.subject is not None:
        try:
            x509.Name.from_rfc4514_string(rule.subject)
        except ValueError:
            raise sec.error("subject", f"an RFC 4514 distinguished name such as 'CN=app,O=Example', "
                                       f"got {rule.subject!r}") from None
    if not (rule.subject or rule.san or rule.fingerprint):
        raise sec.error("subject", "at least one of subject, san or fingerprint to identify the client")
    sec.done()
    return rule


def read_native(sec: Section) -> settings.NativeSettings | None:
    if not sec.flag("enabled", True):
        sec.ignore_rest()  # a switched-off listener keeps its settings for when it is switched on again
        return None
    clients = tuple(read_client(entry) for entry in sec.entries("clients"))
    result = settings.NativeSettings(enabled=True, listen=read_listen(sec, "0.0.0.0", 8444),  # noqa: S104
                                     tls=read_tls(sec, client_ca=True), clients=clients,
                                     max_batch=sec.integer("max_batch", 100, minimum=1, maximum=10_000))
    sec.done()
    return result


def read_ops(sec: Section) -> settings.OpsSettings:
    result = settings.OpsSettings(enabled=sec.flag("enabled", True), listen=read_listen(sec, "127.0.0.1", 9090))
    sec.done()
    return result


def read_audit(sec: Section) -> settings.AuditSettings:
    result = settings.AuditSettings(
        path=sec.path("path", sec.base_dir / "audit.log"),
        fail_closed=sec.flag("fail_closed", True),
        max_bytes=sec.integer("max_bytes", 100 * 1024 * 1024, minimum=4096),
        keep_files=sec.integer("keep_files", 0, minimum=0),
    )
    sec.done()
    return result


def read_logging(sec: Section) -> settings.LoggingSettings:
    result = settings.LoggingSettings(level=sec.choice("level", settings.LogLevel, settings.LogLevel.INFO),
                                      format=sec.choice("format", settings.LogFormat, settings.LogFormat.JSON))
    sec.done()
    return result


def read_limits(sec: Section, keystore: settings.KeyStoreSettings) -> settings.LimitsSettings:
    threads = os.cpu_count() or 2
    if keystore.type == settings.KeyStoreType.PKCS11:
        # A worker thread waits on one HSM session for each operation: fewer threads than sessions would leave
        # sessions (and a network HSM's capacity) idle, whatever the host's cores.
        threads = max(threads, keystore.pool_size)
    result = settings.LimitsSettings(
        max_body_bytes=sec.integer("max_body_bytes", 64 * 1024, minimum=1024, maximum=16 * 1024 * 1024),
        worker_threads=sec.integer("worker_threads", threads, minimum=1, maximum=256),
        request_deadline_ms=sec.integer("request_deadline_ms", 250, minimum=10),
        keep_alive_seconds=sec.integer("keep_alive_seconds", 75, minimum=1),
        refresh_seconds=sec.number("refresh_seconds", 2.0, minimum=0.1),
        rsa_execution=sec.choice("rsa_execution", settings.RsaExecution, settings.RsaExecution.AUTO),
        workers=sec.integer("workers", len(os.sched_getaffinity(0)), minimum=1, maximum=256),
        pin_workers=sec.choice("pin_workers", settings.PinWorkers, settings.PinWorkers.AUTO,
                               booleans=(settings.PinWorkers.AUTO, settings.PinWorkers.OFF)),
        **_rate_limits(sec.section("rate_limits")),
        breaker=_breaker(sec.section("breaker")),
    )
    sec.done()
    return result


def _rate(sec: Section, default: Rate) -> Rate:
    per_second = sec.number("per_second", default.per_second, minimum=0.001)
    return Rate(per_second, sec.integer("burst", max(1, int(per_second * 2)) if sec.has("per_second")
                                        else default.burst, minimum=1))


def _rate_limits(sec: Section) -> dict[str, Any]:
    """limits.rate_limits: {per_second, burst} for every caller, `callers: [{id, per_second, burst}]` apart."""
    default = _rate(sec, settings.LimitsSettings.rate)
    overrides = []
    for entry in sec.entries("callers"):
        overrides.append((entry.string("id"), _rate(entry, default)))
        entry.done()
    sec.done()
    return {"rate": default, "rate_overrides": tuple(overrides)}


def _breaker(sec: Section) -> BreakerSettings | None:
    if not sec.flag("enabled", True):
        sec.ignore_rest()
        return None
    base = BreakerSettings()
    result = BreakerSettings(
        action=sec.choice("action", BreakerAction, base.action),
        window_seconds=float(sec.duration("window", int(base.window_seconds), minimum=10)),
        baseline_seconds=float(sec.duration("baseline", int(base.baseline_seconds), minimum=60)),
        warmup_seconds=float(sec.duration("warmup", int(base.warmup_seconds), minimum=0)),
        factor=sec.number("factor", base.factor, minimum=1.5),
        floor=sec.integer("floor", base.floor, minimum=1),
        slow_per_second=sec.number("slow_per_second", base.slow_per_second, minimum=0.01),
    )
    sec.done()
    return result


def read_rotation(sec: Section) -> settings.RotationSettings:
    result = settings.RotationSettings(every_seconds=sec.duration("every", minimum=settings.MIN_ROTATION_SECONDS))
    sec.done()
    return result


def _base_url(sec: Section, key: str) -> str:
    value = sec.string(key).rstrip("/")
    match = _BASE_URL_RE.match(value)
    if not match:
        raise sec.error(key, f"a base URL such as https://api.mypurecloud.com (no path), got {value!r}")
    # The client secret and bearer tokens travel here: plain http only to a stand-in on this machine.
    if match.group(1) == "http" and match.group(2) not in ("127.0.0.1", "localhost", "[::1]"):
        raise sec.error(key, f"an https:// URL (http only for a loopback test platform), got {value!r}")
    return value


def read_genesys(sec: Section) -> settings.GenesysSettings:
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
    initial = sec.seconds("retry_initial", 2.0, minimum=0.01)
    result = settings.GenesysSettings(
        login_url=login_url,
        api_url=api_url,
        client_id=sec.string("client_id"),
        client_secret=sec.secret("client_secret"),
        config_id=sec.string("config_id"),
        timeout_seconds=sec.seconds("timeout", 15.0, minimum=0.1),
        max_attempts=sec.integer("max_attempts", 6, minimum=1, maximum=100),
        retry_initial_seconds=initial,
        retry_max_seconds=max(initial, sec.seconds("retry_max", 300.0, minimum=0.01)),
    )
    sec.done()
    return result
