"""Metrics scraped from the real ops endpoint, readiness that means something, structured logs."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from lkm.hawk import HawkCredential
from lkm.keys import KeyState
from tests.conftest import Running, wrap


async def scrape(running: Running) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    async with running.session.get(running.url("ops") + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        assert family.documentation, f"{family.name} has no help text"
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for k, v in samples.get(name, {}).items() if wanted <= set(k))


async def test_counts_move_with_requests(running: Running) -> None:
    record = running.create_key()
    await running.server.refresh()
    before = await scrape(running)
    for _ in range(3):
        assert (await running.platform().decrypt(record.id, wrap(record, b"m" * 32))).status == 200
    assert (await running.platform().decrypt(record.id, os.urandom(384))).status == 400
    bad = HawkCredential(id=running.hawk.id, key="wrong")
    assert (await running.platform(bad).decrypt(record.id, wrap(record, b"m" * 32))).status == 401
    assert (await running.native("reader").unwrap(record.id, wrap(record, b"m" * 32))).status == 403
    assert (await running.native("unlisted").request("GET", "/v1/keys")).status == 403
    after = await scrape(running)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("lkm_unwraps_total", route="platform", outcome="ok", key_id=record.id) == 3
    assert delta("lkm_audit_records_total") >= 7
    assert delta("lkm_unwraps_total", route="platform", outcome="decryption_failed") == 1
    assert delta("lkm_unwrap_duration_seconds_count", route="platform") == 4
    assert delta("lkm_auth_failures_total", method="hawk", reason="bad_mac") == 1
    assert delta("lkm_auth_failures_total", method="mtls", reason="forbidden_role") == 1
    assert delta("lkm_auth_failures_total", method="mtls", reason="unknown_client") == 1
    assert delta("lkm_http_requests_total", listener="platform", method="POST", status="200") == 3
    assert delta("lkm_http_requests_total", listener="platform", method="POST", status="401") == 1
    assert value(after, "lkm_keys", state="active") == 1
    assert value(after, "lkm_keystore_up", backend="file") == 1
    assert value(after, "lkm_build_info") == 1
    assert value(after, "lkm_tls_certificate_expiry_timestamp_seconds", listener="native") > 0
    # Labels stay bounded: no request ids or raw paths.
    routes = {dict(k).get("route") for k in after["lkm_http_requests_total"]}
    assert record.id not in "".join(r or "" for r in routes)


async def test_readiness_names_the_failing_check(running: Running) -> None:
    await running.server.update_readiness(force_canary=True)
    async with running.session.get(running.url("ops") + "/readyz") as resp:
        body = await resp.json()
        assert resp.status == 503
        assert body["checks"]["active_key"]["ok"] is False
    running.create_key(KeyState.ACTIVE)
    await running.server.update_readiness(force_canary=True)
    async with running.session.get(running.url("ops") + "/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["checks"]["canary"]["ok"] is True
    samples = await scrape(running)
    assert value(samples, "lkm_ready") == 1


async def test_audit_failure_fails_closed_and_unready(running: Running) -> None:
    record = running.create_key()
    audit_dir = Path(running.server.settings.audit.path).parent
    shutil.rmtree(audit_dir)
    audit_dir.write_text("not a directory any more")  # the trail cannot be written now
    reply = await running.platform().decrypt(record.id, wrap(record, b"a" * 32))
    assert reply.status == 503 and "Retry-After" in reply.headers
    assert "audit" in reply.body["message"]
    await running.server.update_readiness()
    async with running.session.get(running.url("ops") + "/readyz") as resp:
        body = await resp.json()
        assert resp.status == 503 and body["checks"]["audit"]["ok"] is False
    samples = await scrape(running)
    assert value(samples, "lkm_audit_write_failures_total") >= 1
    audit_dir.unlink()


def test_denial_limiter_bounds_records_per_client() -> None:
    from lkm.service import DenialLimiter

    now = [0.0]
    limiter = DenialLimiter(burst=3, per_second=1.0, clock=lambda: now[0])
    assert [limiter.admit("a") for _ in range(5)] == [0, 0, 0, None, None]
    assert limiter.admit("b") == 0  # another client has its own budget
    now[0] += 1.0
    assert limiter.admit("a") == 2  # the next record says how many were suppressed
    assert limiter.admit("a") is None


async def test_a_flood_of_bad_hawk_requests_cannot_flood_the_audit_trail(running: Running) -> None:
    record = running.create_key()
    bad = HawkCredential(id=running.hawk.id, key="wrong")
    client = running.platform(bad)
    before = len(running.audit_lines())
    started = time.monotonic()
    for _ in range(60):
        assert (await client.decrypt(record.id, wrap(record, b"f" * 32))).status == 401
    elapsed = time.monotonic() - started
    denials = [e for e in running.audit_lines()[before:] if e.get("outcome") == "denied"]
    # A burst of 20, then 2 a second.
    assert 20 <= len(denials) <= 21 + 2 * elapsed < 60
    samples = await scrape(running)
    assert value(samples, "lkm_auth_failures_total", method="hawk", reason="bad_mac") == 60
    # Authenticated work is still audited in full.
    assert (await running.platform().decrypt(record.id, wrap(record, b"g" * 32))).status == 200
    assert running.audit_lines()[-1]["action"] == "unwrap"
