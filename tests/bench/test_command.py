"""`lkm bench` runs briefly and correctly: answers verified, no errors, a complete report. Never speed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from lkm import cli
from lkm.bench.report import render_table
from tests.conftest import Running

LATENCY_FIELDS = {"p50", "p90", "p99", "max", "mean"}


def _target_args(running: Running, route: str) -> list[str]:
    key_file = running.tmp / "hawk.key"
    key_file.write_text(running.hawk.key)
    cert, key = running.certs.client("admin")
    url = running.url("platform") + "/key-management/v1/decrypt" if route == "platform" else running.url("native")
    return ["--url", url, "--native-url", running.url("native"), "--ca", str(running.certs.ca_file),
            "--cert", str(cert), "--key", str(key), "--hawk-id", running.hawk.id, "--hawk-key-file", str(key_file)]


async def _bench(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    # The benchmark runs its own event loop, so it gets a thread while the server keeps this one.
    status = await asyncio.to_thread(cli.main, ["bench", *args])
    out = capsys.readouterr().out
    return status, json.loads(out)


@pytest.mark.parametrize(("route", "padding"), [
    ("platform", "oaep-sha1"),  # one timed run stays in the inner loop; the others are slow
    pytest.param("platform", "pkcs1", marks=pytest.mark.slow),
    pytest.param("native", "oaep-sha256", marks=pytest.mark.slow),
    pytest.param("batch", "oaep-sha1", marks=pytest.mark.slow),
])
@pytest.mark.slow
async def test_bench_drives_each_route(running: Running, capsys: pytest.CaptureFixture[str], route: str,
                                       padding: str) -> None:
    running.create_key()
    status, report = await _bench(capsys, *_target_args(running, route), "--route", route, "--padding", padding,
                                  "--concurrency", "3", "--duration", "0.3", "--warmup", "0.1", "--batch-size", "5",
                                  "--verify-every", "1", "--json")
    assert status == 0
    assert report["lkm_bench"] == 1 and report["machine"]["cpus"] >= 1
    (run,) = report["runs"]
    assert run["kind"] == "server" and run["route"] == route and run["padding"] == padding
    assert run["errors"] == {"total": 0, "by_status": {}, "connection": 0, "mismatch": 0}
    assert run["requests"] > 0 and run["verified"] == run["requests"]
    assert run["keys"] == run["requests"] * (5 if route == "batch" else 1)
    assert run["requests_per_s"] > 0 and run["keys_per_s"] > 0
    assert set(run["latency_ms"]) == LATENCY_FIELDS
    assert 0 < run["latency_ms"]["p50"] <= run["latency_ms"]["p99"] <= run["latency_ms"]["max"]
    assert run["connections"] == 3  # keep-alive: one connection per worker for the whole run
    assert run["client_cpu_s"] > 0


async def test_bench_new_connections_resume(running: Running, capsys: pytest.CaptureFixture[str]) -> None:
    running.create_key()
    status, report = await _bench(capsys, *_target_args(running, "platform"), "--new-connections", "--resume",
                                  "--concurrency", "2", "--requests", "6", "--warmup", "0", "--json")
    assert status == 0
    (run,) = report["runs"]
    assert run["errors"]["total"] == 0 and run["requests"] >= 6
    assert run["connections"] >= run["requests"] and run["resumed"] >= 1


@pytest.mark.slow
async def test_bench_compare_reports_the_ratio(running: Running, capsys: pytest.CaptureFixture[str]) -> None:
    record = running.create_key()
    status, report = await _bench(capsys, *_target_args(running, "native"), "-c", str(running.config_path),
                                  "--route", "native", "--key-id", record.id, "--compare", "--threads", "1",
                                  "--concurrency", "2", "--duration", "0.5", "--warmup", "0.1", "--latency-at",
                                  "0.5", "--json")
    assert status == 0
    raw, peak, paced = report["runs"]
    assert raw["kind"] == "raw" and raw["threads"] == 1 and raw["keys_per_s"] > 0
    assert raw["slices"] == peak["slices"] == 1  # half a second: one slice each
    assert peak["errors"]["total"] == 0 and paced["errors"]["total"] == 0 and paced["rate"] > 0
    comparison = report["comparison"]
    assert comparison["server_over_raw"] == pytest.approx(peak["keys_per_s"] / raw["keys_per_s"], abs=0.01)
    assert comparison["latency_at"]["p99_ms"] == paced["latency_ms"]["p99"]
    assert "server/raw" in render_table(report)


async def _compare_on_one_thread(running: Running, capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    """`lkm bench --compare` on the platform route of a new key: raw on one thread, 2 connections, no latency run."""
    record = running.create_key()
    status, report = await _bench(capsys, *_target_args(running, "platform"), "-c", str(running.config_path),
                                  "--key-id", record.id, "--compare", "--threads", "1", "--concurrency", "2",
                                  "--latency-at", "0", "--json", *args)
    assert status == 0
    return report


@pytest.mark.slow
async def test_bench_compare_rounds_alternate_and_take_medians(running: Running,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    report = await _compare_on_one_thread(running, capsys, "--rounds", "3", "--duration", "0.3", "--warmup", "0")
    names = [run["name"] for run in report["runs"]]
    assert names == ["raw#1", "platform#1", "raw#2", "platform#2", "raw#3", "platform#3"]
    comparison = report["comparison"]
    raws = sorted(run["keys_per_s"] for run in report["runs"] if run["kind"] == "raw")
    peaks = sorted(run["keys_per_s"] for run in report["runs"] if run["kind"] == "server")
    assert comparison["raw_keys_per_s"] == raws[1] and comparison["server_keys_per_s"] == peaks[1]
    assert comparison["rounds"] == 3 and len(comparison["round_ratios"]) == 3
    assert all(run["errors"]["total"] == 0 for run in report["runs"] if run["kind"] == "server")
    assert "medians of 3 alternating rounds" in render_table(report)


@pytest.mark.slow
async def test_bench_compare_alternates_raw_and_server_in_slices(running: Running,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Two seconds of each: two one-second slices, the server's connections opened anew for the second."""
    report = await _compare_on_one_thread(running, capsys, "--duration", "2", "--warmup", "0.1")
    raw, peak = report["runs"]
    assert raw["slices"] == peak["slices"] == 2 and peak["connections"] == 2 * 2
    assert raw["seconds"] == pytest.approx(2.0) and peak["seconds"] == pytest.approx(2.0, abs=0.3)
    assert peak["errors"]["total"] == 0 and raw["operations"] > 0


@pytest.mark.slow
async def test_bench_floor_is_measured_on_the_servers_own_store(running: Running,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    report = await _compare_on_one_thread(running, capsys, "--floor", "--duration", "0.3", "--warmup", "0")
    raw, peak, floor = report["runs"]
    assert floor["name"] == "floor" and floor["requests"] > 0
    assert floor["errors"]["total"] == 0 and floor["errors"]["mismatch"] == 0  # it really unwrapped
    assert floor["server_cpu_us_per_request"]  # its own process, not lkm's
    comparison = report["comparison"]
    assert comparison["floor_over_raw"] == pytest.approx(floor["keys_per_s"] / raw["keys_per_s"], abs=0.01)
    assert comparison["server_over_floor"] == pytest.approx(peak["keys_per_s"] / floor["keys_per_s"], abs=0.01)


@pytest.mark.slow
def test_raw_on_a_temporary_store(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--raw", "--threads", "2", "--duration", "0.3", "--json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    assert run["kind"] == "raw" and run["threads"] == 2 and run["operations"] > 0


def test_bench_without_a_target_says_what_to_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--dev-json", str(tmp_path / "missing.json")]) == 2
    assert "lkm serve --dev" in capsys.readouterr().err


def test_raw_runs_on_the_cpus_a_server_is_confined_to() -> None:
    """A server kept to other CPUs than the benchmark's (taskset): raw runs on the server's; else where it is."""
    import os
    import subprocess
    import sys

    from lkm.bench.command import server_cpus

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert server_cpus(child.pid) is None  # the same CPUs as this process: nothing to move to
        os.sched_setaffinity(child.pid, {cpus[-1]})
        assert server_cpus(child.pid) == {cpus[-1]}
    finally:
        child.kill()
        child.wait()
    assert server_cpus(child.pid) is None and server_cpus(None) is None  # gone, or not on this host
