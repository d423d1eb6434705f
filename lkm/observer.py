"""The bridge from the web layer's and the service's events to the Prometheus collectors."""

from __future__ import annotations

from lkm.metrics import AUTH_REASONS, OTHER_ROUTE, Metrics
from lkm.web.plumbing import WebObserver


class MetricsObserver(WebObserver):
    """Feeds the web layer's and the service's events into Prometheus collectors.

    Metrics must never break a request: a label outside the closed sets is logged and dropped, by `Metrics`
    where the label set is first met, so these calls need no guard of their own.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def request_done(self, listener: str, route: str, method: str, status: int | str, seconds: float) -> None:
        self.metrics.observe_http(listener, None if route == OTHER_ROUTE else route, method, status, seconds)

    def inflight(self, listener: str, delta: int) -> None:
        self.metrics.observe_inflight(listener, delta)

    def auth_failure(self, method: str, reason: str) -> None:
        self.metrics.auth_failed(method, reason if reason in AUTH_REASONS else "malformed")

    def connection_refused(self, listener: str, reason: str) -> None:
        self.metrics.connections_refused.labels(listener, reason).inc()

    def connection_timed_out(self, listener: str) -> None:
        self.metrics.connections_timed_out.labels(listener).inc()

    def connections_open(self, listener: str, delta: int) -> None:
        self.metrics.connections_open.labels(listener).inc(delta)

    def malformed_request(self, listener: str, status: int) -> None:
        self.request_done(listener, OTHER_ROUTE, "other", status, 0.0)

    def unwrap_done(self, route: str, key_id: str | None, outcome: str, seconds: float) -> None:
        self.metrics.observe_unwrap(route, outcome, seconds, key_id)

    def keystore_op(self, backend: str, operation: str, seconds: float) -> None:
        self.metrics.observe_keystore(backend, operation, seconds)
