"""Prometheus collectors of lkm, on a registry owned by one `Metrics` instance.

Nothing here is global: every app (and every test) makes its own `Metrics()`, and `render()` serves the
operations listener's `/metrics`. prometheus_client is imported by this module only.

Label values are closed sets (the tuples below) or key ids of keys that exist in the store; request ids, raw
paths, user ids and unknown key ids never become labels. The `observe_*`/`set_*` helpers enforce that and
are what the rest of lkm calls; the collectors stay public attributes for the rare direct use. The per-request
helpers (`observe_*`, `auth_failed`) log and drop a value outside its set, since metrics must never fail a
request; the others raise.

With several server processes, prometheus-client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by the
supervisor before a worker starts) has each process write its values to files, and the supervisor's
`/metrics` adds them up (`render_processes`); each gauge says how (its `multiprocess_mode`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping
from enum import StrEnum
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from lkm.auth import ActorKind
from lkm.keys import KeyState
from lkm.metricwrites import DeferredWrites
from lkm.outcomes import UnwrapOutcome
from lkm.web.routes import ListenerName

_MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
log = logging.getLogger("lkm.server")


def render_processes(directory: str) -> tuple[bytes, str]:
    """The totals of every server process that wrote to `directory` (prometheus-client multiprocess mode)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST


def forget_process(directory: str, pid: int) -> None:
    """A worker process ended: its live gauges (in-flight requests, readiness) stop counting."""
    multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]



class UnwrapRoute(StrEnum):
    PLATFORM = "platform"
    NATIVE = "native"
    BATCH = "batch"


class AuthReason(StrEnum):
    UNKNOWN_ID = "unknown_id"
    BAD_MAC = "bad_mac"
    BAD_HASH = "bad_hash"
    STALE_TIMESTAMP = "stale_timestamp"
    REPLAY = "replay"
    MALFORMED = "malformed"
    MISSING = "missing"
    NO_CERTIFICATE = "no_certificate"
    UNKNOWN_CLIENT = "unknown_client"
    FORBIDDEN_ROLE = "forbidden_role"


class RefusalReason(StrEnum):
    """Why a connection was closed at accept, before TLS and before any HTTP."""

    NOT_ALLOWED = "not_allowed"  # the peer is outside the listener's allowed_networks
    LISTENER_FULL = "listener_full"  # the listener holds max_connections already
    CLIENT_FULL = "client_full"  # the peer holds max_connections_per_client already
    NO_DESCRIPTORS = "no_descriptors"  # the process ran out of file descriptors


class KeystoreBackend(StrEnum):
    FILE = "file"
    PKCS11 = "pkcs11"
    POSTGRESQL = "postgresql"


class KeystoreOperation(StrEnum):
    DECRYPT = "decrypt"
    CREATE = "create"
    LIST = "list"
    REFRESH = "refresh"
    CHECK = "check"


class ReadinessCheck(StrEnum):
    KEYSTORE = "keystore"
    ACTIVE_KEY = "active_key"
    CERTIFICATES = "certificates"
    AUDIT = "audit"
    CANARY = "canary"


class Outcome(StrEnum):
    """How a rotation or a platform registration ended."""

    OK = "ok"
    FAILED = "failed"


# The label sets as tuples of plain values, in declaration order, for the callers that iterate or test membership.
LISTENERS: tuple[str, ...] = tuple(ListenerName)
UNWRAP_ROUTES: tuple[str, ...] = tuple(UnwrapRoute)
UNWRAP_OUTCOMES: tuple[str, ...] = tuple(UnwrapOutcome)
AUTH_METHODS: tuple[str, ...] = tuple(kind for kind in ActorKind if kind is not ActorKind.SYSTEM)
AUTH_REASONS: tuple[str, ...] = tuple(AuthReason)
KEY_STATES: tuple[str, ...] = tuple(KeyState)
KEYSTORE_BACKENDS: tuple[str, ...] = tuple(KeystoreBackend)
KEYSTORE_OPERATIONS: tuple[str, ...] = tuple(KeystoreOperation)
READINESS_CHECKS: tuple[str, ...] = tuple(ReadinessCheck)
OUTCOMES: tuple[str, ...] = tuple(Outcome)
# The pairs that can happen, created at 0 on start so that alerts see the first failure of each.
AUTH_FAILURE_PAIRS: tuple[tuple[ActorKind, AuthReason], ...] = (
    *((ActorKind.HAWK, reason) for reason in (
        AuthReason.UNKNOWN_ID, AuthReason.BAD_MAC, AuthReason.BAD_HASH, AuthReason.STALE_TIMESTAMP,
        AuthReason.REPLAY, AuthReason.MALFORMED, AuthReason.MISSING, AuthReason.FORBIDDEN_ROLE)),
    *((ActorKind.MTLS, reason) for reason in (
        AuthReason.NO_CERTIFICATE, AuthReason.UNKNOWN_CLIENT, AuthReason.FORBIDDEN_ROLE, AuthReason.MALFORMED)),
    (ActorKind.CLI, AuthReason.FORBIDDEN_ROLE),
)
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

NO_KEY = "none"
"""The key_id label when no existing key is involved (unknown id, request rejected before the lookup)."""
OTHER_ROUTE = "other"
"""The route label of requests that matched no route template (404s, probes of random paths)."""

# From 1 ms (an RSA-3072 private operation in software) to 1 s, past the platform's 250 ms-ish budget.
LATENCY_BUCKETS = (.001, .0025, .005, .0075, .01, .025, .05, .075, .1, .25, .5, 1.0, 2.5)
# Key-store operations also include key generation (RSA-3072 takes up to seconds) and HSM round trips.
KEYSTORE_BUCKETS = (.0005, .001, .0025, .005, .0075, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0)


def _check(value: str, allowed: tuple[str, ...], label: str) -> str:
    """`value` if it is one of the closed set `allowed`, so no caller's text can become a label value."""
    if value not in allowed:
        raise ValueError(f"metrics label {label}={value!r} is not one of {', '.join(allowed)}")
    return str(value)


def _accepted(value: str, allowed: tuple[str, ...], label: str) -> bool:
    """`_check` for the per-request helpers, which must never fail a request: a refusal is logged instead, and
    the write dropped. It is called only where a label set is first met (a cache miss), so it costs the cache
    hits nothing; a refused set is never cached, so each recurrence is logged too."""
    try:
        _check(value, allowed, label)
    except ValueError as exc:
        log.warning("metric not recorded: %s", exc)
        return False
    return True


class Metrics:
    """All lkm metrics on one explicit registry."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._active_key_created: float | None = None
        self._next_rotation_due: float | None = None
        # Labelled children of the per-request series, by label values: labels() validates and locks on every
        # call, which costs more than the increment itself on the hot path. Label sets are closed (see above),
        # so this stays small; children are never removed from these collectors.
        self._hot: dict[tuple[object, ...], tuple[Any, ...]] = {}
        # The per-request writes, in batches once a server attaches its event loop (lkm.metricwrites).
        self.writes = DeferredWrites()
        r = self.registry

        # Unwraps: the product.
        self.unwraps: Counter = Counter(
            "lkm_unwraps_total",
            "Unwrap (RSA decrypt) requests by route, key id and outcome. key_id is 'none' when no existing "
            "key was involved.",
            ["route", "key_id", "outcome"], registry=r)
        self.unwrap_duration: Histogram = Histogram(
            "lkm_unwrap_duration_seconds",
            "Time to answer an unwrap request, from authenticated request to response, by route.",
            ["route"], buckets=LATENCY_BUCKETS, registry=r)

        # HTTP.
        self.http_requests: Counter = Counter(
            "lkm_http_requests_total",
            "HTTP requests by listener, route template ('other' when none matched), method and status.",
            ["listener", "route", "method", "status"], registry=r)
        self.http_duration: Histogram = Histogram(
            "lkm_http_request_duration_seconds",
            "HTTP request duration by listener and route template.",
            ["listener", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.auth_failures: Counter = Counter(
            "lkm_auth_failures_total",
            "Rejected authentication or authorization attempts by method (mtls, hawk, cli) and reason.",
            ["method", "reason"], registry=r)
        self.inflight: Gauge = Gauge(
            "lkm_inflight_requests", "Requests being handled now, by listener.", ["listener"], registry=r,
            multiprocess_mode="livesum")
        self.shed: Counter = Counter(
            "lkm_requests_shed_total",
            "Requests refused with 503 because their private-key operation could not start within "
            "limits.request_deadline_ms, by listener.",
            ["listener"], registry=r)

        self.connections_refused: Counter = Counter(
            "lkm_connections_refused_total",
            "Connections closed at accept, before TLS, by listener and reason (not_allowed, listener_full, "
            "client_full, no_descriptors).",
            ["listener", "reason"], registry=r)
        self.connections_timed_out: Counter = Counter(
            "lkm_connections_timed_out_total",
            "Connections closed because a request (TLS handshake, headers, body) did not arrive in full within "
            "the listener's request_timeout, by listener.",
            ["listener"], registry=r)
        self.connections_open: Gauge = Gauge(
            "lkm_open_connections", "Open connections by listener.", ["listener"], registry=r)

        # Keys and their lifecycle.
        self.keys: Gauge = Gauge("lkm_keys", "Keys in the key store by state.", ["state"], registry=r,
                                 multiprocess_mode="livemostrecent")
        self.active_key_age: Gauge = Gauge(
            "lkm_active_key_age_seconds", "Seconds since the active key was created (0 when there is none).",
            registry=r, multiprocess_mode="livemostrecent")
        self.next_rotation: Gauge = Gauge(
            "lkm_next_rotation_seconds",
            "Seconds until the next scheduled rotation; negative when overdue, 0 when no schedule.",
            registry=r, multiprocess_mode="livemostrecent")
        self.rotation_period: Gauge = Gauge(
            "lkm_rotation_period_seconds", "Configured rotation period in seconds (0 when no schedule).",
            registry=r, multiprocess_mode="livemax")
        self.rotations: Counter = Counter(
            "lkm_rotations_total", "Key rotations (manual and scheduled) by outcome.", ["outcome"],
            registry=r)
        self.registrations: Counter = Counter(
            "lkm_platform_registrations_total",
            "Attempts to register a public key with the platform API, by outcome.", ["outcome"], registry=r)

        # Key store.
        self.keystore_up: Gauge = Gauge(
            "lkm_keystore_up", "1 if the key store answered its last check, else 0, by backend.",
            ["backend"], registry=r, multiprocess_mode="livemin")
        self.keystore_duration: Histogram = Histogram(
            "lkm_keystore_operation_duration_seconds",
            "Key-store operation duration by backend and operation.",
            ["backend", "operation"], buckets=KEYSTORE_BUCKETS, registry=r)

        # TLS, audit, readiness.
        self.tls_expiry: Gauge = Gauge(
            "lkm_tls_certificate_expiry_timestamp_seconds",
            "Unix time at which the listener's server certificate expires (notAfter).",
            ["listener"], registry=r, multiprocess_mode="livemin")
        self.audit_records: Counter = Counter(
            "lkm_audit_records_total", "Audit records written.", registry=r)
        self.audit_failures: Counter = Counter(
            "lkm_audit_write_failures_total", "Audit records that could not be written.", registry=r)
        self.ready: Gauge = Gauge("lkm_ready", "1 if /readyz answers ready, else 0.", registry=r,
                                  multiprocess_mode="livemin")
        self.readiness_check: Gauge = Gauge(
            "lkm_readiness_check", "Result of each readiness check: 1 passing, 0 failing.", ["check"],
            registry=r, multiprocess_mode="livemin")

        # Callers (label: an authenticated identity's name, so bounded by the configured credentials and rules).
        self.rate_limited: Counter = Counter(
            "lkm_rate_limited_total", "Unwrap requests refused with 429 by a caller's rate limit.", ["caller"],
            registry=r)
        self.volume_anomaly: Gauge = Gauge(
            "lkm_unwrap_volume_anomaly",
            "1 while a caller's unwraps are far above its own baseline (the volume breaker), else 0.", ["caller"],
            registry=r, multiprocess_mode="livemax")

        # Info.
        self.build_info: Gauge = Gauge(
            "lkm_build_info", "Always 1; the labels name the lkm version and Python version.",
            ["version", "python"], registry=r, multiprocess_mode="livemax")
        self.config_info: Gauge = Gauge(
            "lkm_config_info",
            "Always 1; the labels say which key store and which optional features are configured.",
            ["keystore", "rotation", "platform_registration"], registry=r, multiprocess_mode="livemax")

        self._initialize_series()

    def _initialize_series(self) -> None:
        # Counters that alerts take increase() of must exist at 0 before their first event, or that event
        # is lost to the rate functions.
        for route in UNWRAP_ROUTES:
            self.unwrap_duration.labels(route)
        for method, reason in AUTH_FAILURE_PAIRS:
            self.auth_failures.labels(method, reason)
        for outcome in OUTCOMES:
            self.rotations.labels(outcome)
            self.registrations.labels(outcome)
        for listener in LISTENERS:
            self.inflight.labels(listener)
            self.shed.labels(listener)
        for check in READINESS_CHECKS:
            self.readiness_check.labels(check)
        self.set_key_states({})

    def _refresh_clock_gauges(self) -> None:
        # Only what set_active_key / set_rotation_schedule gave; a gauge set directly is left alone.
        now = self._clock()
        if self._active_key_created is not None:
            self.active_key_age.set(max(0.0, now - self._active_key_created))
        if self._next_rotation_due is not None:
            self.next_rotation.set(self._next_rotation_due - now)

    # --- exposition -----------------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The scrape body and its content type; pending writes and clock-derived gauges are brought up to date
        first."""
        self.writes.flush()
        self._refresh_clock_gauges()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # --- info ---------------------------------------------------------------------------------------------

    def set_build_info(self, version: str) -> None:
        if not _MULTIPROCESS:  # prometheus-client cannot clear labels across processes; set once there
            self.build_info.clear()
        self.build_info.labels(version, platform.python_version()).set(1)

    def set_config_info(self, keystore: str, rotation: bool, registration: bool) -> None:
        _check(keystore, KEYSTORE_BACKENDS, "keystore")
        if not _MULTIPROCESS:
            self.config_info.clear()
        self.config_info.labels(keystore, "on" if rotation else "off", "on" if registration else "off").set(1)

    # --- events -------------------------------------------------------------------------------------------

    def observe_unwrap(self, route: str, outcome: str, seconds: float, key_id: str | None = None) -> None:
        """Count one unwrap. Pass key_id only for a key that exists in the store, never a caller's guess."""
        label = NO_KEY if key_id is None or outcome == UnwrapOutcome.KEY_NOT_FOUND else key_id
        children = self._hot.get(("unwrap", route, outcome, label))
        if children is None:
            if not (_accepted(route, UNWRAP_ROUTES, "route") and _accepted(outcome, UNWRAP_OUTCOMES, "outcome")):
                return
            children = self._hot[("unwrap", route, outcome, label)] = (self.unwraps.labels(route, label, outcome),
                                                                      self.unwrap_duration.labels(route))
        self.writes.inc(children[0])
        self.writes.observe(children[1], seconds)

    def observe_inflight(self, listener: str, delta: int) -> None:
        """A request started (+1) or ended (-1) on `listener`."""
        child = self._hot.get(("inflight", listener))
        if child is None:
            child = self._hot[("inflight", listener)] = (self.inflight.labels(_check(listener, LISTENERS,
                                                                                      "listener")),)
        self.writes.inc(child[0], delta)

    def observe_http(self, listener: str, route: str | None, method: str, status: int | str,
                     seconds: float) -> None:
        """route: the matched route template (e.g. '/v1/keys/{id}/unwrap'), None when nothing matched."""
        # Keyed on the label values, not the raw request: a client's invented method names share one entry.
        template = route or OTHER_ROUTE
        verb = method if method in HTTP_METHODS else method.upper() if method.upper() in HTTP_METHODS else "other"
        children = self._hot.get(("http", listener, template, verb, status))
        if children is None:
            if not _accepted(listener, LISTENERS, "listener"):
                return
            children = self._hot[("http", listener, template, verb, status)] = (
                self.http_requests.labels(listener, template, verb, str(status)),
                self.http_duration.labels(listener, template))
        self.writes.inc(children[0])
        self.writes.observe(children[1], seconds)

    def auth_failed(self, method: str, reason: str) -> None:
        child = self._hot.get(("auth", method, reason))
        if child is None:
            if not (_accepted(method, AUTH_METHODS, "method") and _accepted(reason, AUTH_REASONS, "reason")):
                return
            child = self._hot[("auth", method, reason)] = (self.auth_failures.labels(method, reason),)
        child[0].inc()

    def observe_keystore(self, backend: str, operation: str, seconds: float) -> None:
        child = self._hot.get(("keystore", backend, operation))
        if child is None:
            if not (_accepted(backend, KEYSTORE_BACKENDS, "backend")
                    and _accepted(operation, KEYSTORE_OPERATIONS, "operation")):
                return
            child = self._hot[("keystore", backend, operation)] = (self.keystore_duration.labels(backend, operation),)
        self.writes.observe(child[0], seconds)

    def throttled(self, caller: str) -> None:
        self.rate_limited.labels(caller).inc()

    def anomaly(self, caller: str, anomalous: bool) -> None:
        self.volume_anomaly.labels(caller).set(1 if anomalous else 0)

    def rotation_done(self, ok: bool) -> None:
        self.rotations.labels(Outcome.OK if ok else Outcome.FAILED).inc()

    def registration_done(self, ok: bool) -> None:
        self.registrations.labels(Outcome.OK if ok else Outcome.FAILED).inc()

    # --- state ----------------------------------------------------------------------------------------------

    def set_key_states(self, counts: Mapping[str, int]) -> None:
        unknown = set(counts) - set(KEY_STATES)
        if unknown:
            raise ValueError(f"unknown key states {sorted(unknown)}; expected {', '.join(KEY_STATES)}")
        for state in KEY_STATES:
            self.keys.labels(state).set(counts.get(state, 0))

    def set_active_key(self, created_timestamp: float | None) -> None:
        """Unix time the active key was created, or None; its age is computed at each scrape."""
        self._active_key_created = created_timestamp
        if created_timestamp is None:
            self.active_key_age.set(0)

    def set_rotation_schedule(self, period_seconds: float | None, next_due_timestamp: float | None) -> None:
        """The schedule (None: no schedule) and the unix time of the next rotation; the countdown is live."""
        self.rotation_period.set(period_seconds or 0)
        self._next_rotation_due = next_due_timestamp if period_seconds else None
        if self._next_rotation_due is None:
            self.next_rotation.set(0)

    def set_keystore_up(self, backend: str, up: bool) -> None:
        self.keystore_up.labels(_check(backend, KEYSTORE_BACKENDS, "backend")).set(1 if up else 0)

    def set_certificate_expiry(self, listener: str, not_after_timestamp: float) -> None:
        self.tls_expiry.labels(_check(listener, LISTENERS, "listener")).set(not_after_timestamp)

    def set_readiness(self, checks: Mapping[str, bool]) -> None:
        """What /readyz just decided: each check's result, and ready only if there were checks and all passed.

        A check left out (not run in this configuration) is dropped from lkm_readiness_check.
        """
        unknown = set(checks) - set(READINESS_CHECKS)
        if unknown:
            expected = ", ".join(READINESS_CHECKS)
            raise ValueError(f"unknown readiness checks {sorted(unknown)}; expected {expected}")
        for check in READINESS_CHECKS:
            if check in checks:
                self.readiness_check.labels(check).set(1 if checks[check] else 0)
            else:
                with contextlib.suppress(KeyError):
                    self.readiness_check.remove(check)
        self.ready.set(1 if checks and all(checks.values()) else 0)
