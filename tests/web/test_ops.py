"""The operations listener: liveness, readiness that means something, and the metrics endpoint."""

from __future__ import annotations

from lkm.web.ops import ReadinessView
from tests.conftest import Running


def test_readiness_needs_every_check_and_at_least_one() -> None:
    view = ReadinessView()
    assert view.ready is False  # nothing checked yet is not ready
    view.checks = {"keystore": (True, "file"), "audit": (True, "writable")}
    assert view.ready is True
    view.checks["audit"] = (False, "audit trail not writable")
    assert view.ready is False
    assert view.to_json()["checks"]["audit"] == {"ok": False, "detail": "audit trail not writable"}


async def test_ops_health_and_readiness(running: Running) -> None:
    running.create_key()
    await running.server.update_readiness(force_canary=True)
    async with running.session.get(running.url("ops") + "/healthz") as resp:
        assert resp.status == 200
    async with running.session.get(running.url("ops") + "/readyz") as resp:
        body = await resp.json()
        assert resp.status == 200, body
        assert body["ready"] is True
        assert set(body["checks"]) == {"keystore", "active_key", "certificates", "audit", "canary"}


async def test_metrics_endpoint_serves_prometheus_text(running: Running) -> None:
    async with running.session.get(running.url("ops") + "/metrics") as resp:
        text = await resp.text()
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    assert "lkm_build_info" in text


async def test_ops_errors_use_the_native_error_shape(running: Running) -> None:
    async with running.session.post(running.url("ops") + "/healthz") as resp:
        body = await resp.json()
        assert resp.status == 405 and resp.headers["Allow"] == "GET,HEAD"
    assert body["error"]["code"] == "method_not_allowed" and body["request_id"] == resp.headers["X-Request-Id"]
