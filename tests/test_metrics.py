from __future__ import annotations

import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from lkm.metrics import KEY_STATES, READINESS_CHECKS, Metrics
from lkm.observer import MetricsObserver

REQUIRED_FAMILIES = {
    "lkm_unwraps": "counter",
    "lkm_unwrap_duration_seconds": "histogram",
    "lkm_http_requests": "counter",
    "lkm_http_request_duration_seconds": "histogram",
    "lkm_auth_failures": "counter",
    "lkm_keys": "gauge",
    "lkm_active_key_age_seconds": "gauge",
    "lkm_next_rotation_seconds": "gauge",
    "lkm_rotation_period_seconds": "gauge",
    "lkm_rotations": "counter",
    "lkm_platform_registrations": "counter",
    "lkm_keystore_up": "gauge",
    "lkm_keystore_operation_duration_seconds": "histogram",
    "lkm_tls_certificate_expiry_timestamp_seconds": "gauge",
    "lkm_audit_write_failures": "counter",
    "lkm_audit_records": "counter",
    "lkm_inflight_requests": "gauge",
    "lkm_requests_shed": "counter",
    "lkm_ready": "gauge",
    "lkm_readiness_check": "gauge",
    "lkm_build_info": "gauge",
    "lkm_config_info": "gauge",
}


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def scrape(metrics: Metrics) -> list[Sample]:
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    return [s for fam in text_string_to_metric_families(body.decode()) for s in fam.samples]


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    found = [s.value for s in scrape(metrics) if s.name == name and s.labels == labels]
    assert len(found) <= 1
    return found[0] if found else None


def test_every_family_is_present_typed_and_has_help() -> None:
    body, _ = Metrics().render()
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name, kind in REQUIRED_FAMILIES.items():
        assert name in families, name
        assert families[name].type == kind, name
    for fam in families.values():
        assert fam.documentation.strip(), f"{fam.name} has no help text"
        assert fam.name.startswith("lkm_"), fam.name


def test_unwrap_counts_and_latency_move() -> None:
    m = Metrics()
    key = "0b9a3c1e-5a55-4d3e-9b7e-6a2a6f0c1d2e"
    m.observe_unwrap("platform", "ok", 0.003, key_id=key)
    m.observe_unwrap("platform", "ok", 0.004, key_id=key)
    m.observe_unwrap("native", "decryption_failed", 0.002, key_id=key)
    assert value(m, "lkm_unwraps_total", route="platform", key_id=key, outcome="ok") == 2
    assert value(m, "lkm_unwraps_total", route="native", key_id=key, outcome="decryption_failed") == 1
    assert value(m, "lkm_unwrap_duration_seconds_count", route="platform") == 2
    assert value(m, "lkm_unwrap_duration_seconds_bucket", route="platform", le="0.0025") == 0
    assert value(m, "lkm_unwrap_duration_seconds_bucket", route="platform", le="0.005") == 2


def test_unknown_key_ids_never_become_labels() -> None:
    m = Metrics()
    m.observe_unwrap("platform", "key_not_found", 0.001, key_id="attacker-chosen-string")
    m.observe_unwrap("native", "invalid_request", 0.001)
    key_ids = {s.labels["key_id"] for s in scrape(m) if s.name == "lkm_unwraps_total"}
    assert key_ids == {"none"}


def test_closed_label_sets_are_enforced_and_a_refusal_never_fails_a_request(
        caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics()
    observer = MetricsObserver(m)
    caplog.set_level(logging.WARNING, logger="lkm.server")
    for _ in range(2):  # a refused label set is not cached: every write to it is refused and logged again
        observer.request_done("nowhere", "/v1/keys", "GET", 200, 0.01)
        observer.auth_failure("carrier-pigeon", "bad_mac")
        m.auth_failed("hawk", "because")
        observer.unwrap_done("platform", None, "weird", 0.001)
        observer.unwrap_done("/key-management/v1/decrypt", None, "ok", 0.001)
        observer.keystore_op("floppy", "decrypt", 0.001)
        observer.keystore_op("file", "defrag", 0.001)
    refusals = [r.getMessage() for r in caplog.records if r.name == "lkm.server" and r.levelno == logging.WARNING]
    labels = ["listener='nowhere'", "method='carrier-pigeon'", "reason='because'", "outcome='weird'",
              "route='/key-management/v1/decrypt'", "backend='floppy'", "operation='defrag'"]
    assert len(refusals) == 2 * len(labels)
    for label, refusal in zip(labels * 2, refusals, strict=True):
        assert refusal.startswith(f"metric not recorded: metrics label {label} is not one of "), refusal
    refused = {"nowhere", "carrier-pigeon", "because", "weird", "/key-management/v1/decrypt", "floppy", "defrag"}
    assert not [sample for sample in scrape(m) if refused & set(sample.labels.values())]
    with pytest.raises(ValueError, match="unknown key states"):  # state, not requests: a bug here should fail
        m.set_key_states({"lost": 1})


def test_http_requests_use_templates_and_bounded_methods() -> None:
    m = Metrics()
    m.observe_http("native", "/v1/keys/{id}/unwrap", "post", 200, 0.01)
    m.observe_http("native", None, "BREW", 404, 0.001)
    assert value(m, "lkm_http_requests_total", listener="native", route="/v1/keys/{id}/unwrap",
                 method="POST", status="200") == 1
    assert value(m, "lkm_http_requests_total", listener="native", route="other", method="other",
                 status="404") == 1
    assert value(m, "lkm_http_request_duration_seconds_count", listener="native", route="other") == 1


def test_auth_failures_start_at_zero_and_move() -> None:
    m = Metrics()
    assert value(m, "lkm_auth_failures_total", method="hawk", reason="bad_mac") == 0
    m.auth_failed("hawk", "bad_mac")
    m.auth_failed("mtls", "unknown_client")
    assert value(m, "lkm_auth_failures_total", method="hawk", reason="bad_mac") == 1
    assert value(m, "lkm_auth_failures_total", method="mtls", reason="unknown_client") == 1


def test_lifecycle_counters_and_keystore() -> None:
    m = Metrics()
    m.rotation_done(True)
    m.rotation_done(False)
    m.registration_done(False)
    m.set_keystore_up("pkcs11", True)
    m.observe_keystore("pkcs11", "decrypt", 0.002)
    m.audit_records.inc(3)
    m.audit_failures.inc()
    m.shed.labels("platform").inc()
    m.inflight.labels("native").inc()
    assert value(m, "lkm_rotations_total", outcome="ok") == 1
    assert value(m, "lkm_rotations_total", outcome="failed") == 1
    assert value(m, "lkm_platform_registrations_total", outcome="failed") == 1
    assert value(m, "lkm_platform_registrations_total", outcome="ok") == 0
    assert value(m, "lkm_keystore_up", backend="pkcs11") == 1
    assert value(m, "lkm_keystore_operation_duration_seconds_count", backend="pkcs11",
                 operation="decrypt") == 1
    assert value(m, "lkm_audit_records_total") == 3
    assert value(m, "lkm_audit_write_failures_total") == 1
    assert value(m, "lkm_requests_shed_total", listener="platform") == 1
    assert value(m, "lkm_inflight_requests", listener="native") == 1


def test_key_states_sets_every_state() -> None:
    m = Metrics()
    m.set_key_states({"active": 1, "retired": 4})
    m.set_key_states({"active": 1, "disabled": 2})
    assert {s: value(m, "lkm_keys", state=s) for s in KEY_STATES} == {
        "pending_activation": 0, "active": 1, "retired": 0, "disabled": 2, "pending_destruction": 0,
        "destroyed": 0}


def test_key_age_and_rotation_countdown_are_computed_at_scrape_time() -> None:
    clock = FakeClock(1_000_000.0)
    m = Metrics(clock=clock)
    assert value(m, "lkm_active_key_age_seconds") == 0
    assert value(m, "lkm_rotation_period_seconds") == 0
    m.set_active_key(clock.now - 100)
    m.set_rotation_schedule(30 * 86400, clock.now + 60)
    assert value(m, "lkm_active_key_age_seconds") == 100
    assert value(m, "lkm_next_rotation_seconds") == 60
    clock.now += 3600
    assert value(m, "lkm_active_key_age_seconds") == 3700
    assert value(m, "lkm_next_rotation_seconds") == -3540
    assert value(m, "lkm_rotation_period_seconds") == 30 * 86400
    m.set_rotation_schedule(None, None)
    m.set_active_key(None)
    assert value(m, "lkm_next_rotation_seconds") == 0
    assert value(m, "lkm_rotation_period_seconds") == 0
    assert value(m, "lkm_active_key_age_seconds") == 0


def test_gauges_set_directly_are_not_overwritten() -> None:
    m = Metrics()
    m.active_key_age.set(42)
    m.next_rotation.set(-5)
    assert value(m, "lkm_active_key_age_seconds") == 42
    assert value(m, "lkm_next_rotation_seconds") == -5


def test_readiness_and_certificates() -> None:
    m = Metrics()
    assert value(m, "lkm_ready") == 0
    m.set_readiness(dict.fromkeys(READINESS_CHECKS, True))
    assert value(m, "lkm_ready") == 1
    m.set_readiness({**dict.fromkeys(READINESS_CHECKS, True), "audit": False})
    assert value(m, "lkm_ready") == 0
    assert value(m, "lkm_readiness_check", check="audit") == 0
    assert value(m, "lkm_readiness_check", check="canary") == 1
    m.set_readiness({"keystore": True, "audit": True})
    assert value(m, "lkm_ready") == 1
    assert value(m, "lkm_readiness_check", check="canary") is None
    m.set_readiness({})
    assert value(m, "lkm_ready") == 0
    m.set_certificate_expiry("platform", 1_900_000_000)
    assert value(m, "lkm_tls_certificate_expiry_timestamp_seconds", listener="platform") == 1_900_000_000


def test_info_metrics() -> None:
    m = Metrics()
    m.set_build_info("1.2.3")
    m.set_build_info("1.2.4")
    m.set_config_info("file", rotation=True, registration=False)
    build = [s for s in scrape(m) if s.name == "lkm_build_info"]
    assert len(build) == 1
    assert build[0].labels["version"] == "1.2.4"
    assert build[0].labels["python"].count(".") == 2
    assert value(m, "lkm_config_info", keystore="file", rotation="on", platform_registration="off") == 1
    with pytest.raises(ValueError, match="keystore"):
        m.set_config_info("vault", rotation=False, registration=False)


def test_two_instances_do_not_share_state() -> None:
    a, b = Metrics(), Metrics()
    a.observe_unwrap("platform", "ok", 0.001, key_id="k")
    a.audit_failures.inc()
    a.set_key_states({"active": 1})
    assert value(a, "lkm_unwraps_total", route="platform", key_id="k", outcome="ok") == 1
    assert value(b, "lkm_unwraps_total", route="platform", key_id="k", outcome="ok") is None
    assert value(b, "lkm_audit_write_failures_total") == 0
    assert value(b, "lkm_keys", state="active") == 0
    assert a.registry is not b.registry
