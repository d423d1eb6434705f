"""`lkm bench suite`: every measurement of the README's table runs and is reported (never speed).

The end-to-end run takes one round against real servers (each round costs seconds of CPU); what needs several
rounds (the medians, the ratios and efficiencies of every round, the median round) is proved by `summarize` on
a report of three rounds, made up so that taking the first, the middle or the last round of a series instead of
its median gets a figure wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lkm import cli
from lkm.bench.suite import ONE_CORE, RAW_BESIDE_LOAD, RAW_ONE_CORE, summarize


@pytest.mark.slow
@pytest.mark.long(11)
def test_suite_runs_every_measurement_of_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["bench", "suite", "--dev-dir", str(tmp_path / "dev"), "--duration", "0.2", "--warmup", "0",
                       "--concurrency", "2", "--keys", "0", "--rounds", "1", "--json"])
    assert status == 0
    report = json.loads(capsys.readouterr().out)
    names = [run["name"] for run in report["runs"]]
    cpus = report["machine"]["cpus"]
    peak = f"platform ({cpus} worker{'s' if cpus > 1 else ''})"
    assert f"raw {cpus} threads" in names and "floor (leanest Python endpoint)" in names and peak in names
    assert not [name for name in names if "#" in name], names  # one round: no round tags
    assert "platform at 80% of peak" in names and "batch of 100" in names and "native, new connection, resumed" in names
    served = [run for run in report["runs"] if run["kind"] == "server"]
    assert all(run["errors"]["mismatch"] == 0 and run["requests"] > 0 for run in served), served
    # --concurrency is per server process: the peak's server runs one process per CPU
    assert {run["name"]: run["concurrency"] for run in served if run["name"] in (peak, ONE_CORE)} == \
        ({peak: 2 * cpus, ONE_CORE: 2} if cpus > 1 else {peak: 2})
    closed_loop = [run for run in served if run["name"] in (peak, "floor (leanest Python endpoint)", ONE_CORE)]
    assert len(closed_loop) == (3 if cpus > 1 else 2), names
    assert all(run["errors"]["total"] == 0 for run in closed_loop), closed_loop
    summary = report["summary"]
    assert "round_ratios" not in summary  # a ratio per round only when there are rounds to compare
    assert summary["server_over_raw"] > 0 and summary["floor_over_raw"] > 0 and summary["p99_ms_at_80_percent"] > 0
    # CPU per unwrap from /proc: the one-core server where there are two cores, against raw of the same rounds
    assert summary["server_cpu_us_per_unwrap"] > 0 and summary["raw_cpu_us_per_operation"] > 0
    assert summary["efficiency"] > 0 and summary["projected_16_cores_over_raw"] > 0
    measured = next(run for run in report["runs"] if run["name"] == summary["cpu_run"])
    assert "lkm-loop" in measured["threads_us_per_unwrap"] and "lkm-audit" in measured["threads_us_per_unwrap"]
    if cpus > 1:
        assert summary["cpu_run"].startswith("platform (1 process on 1 core, RSA inline)")
        assert "lkm-rsa" not in measured["threads_us_per_unwrap"]  # inline: no worker threads
        # The yardstick: raw on the server's core beside idle ones, in slices between the server's; raw there
        # beside busy cores is shown too.
        idle = [run for run in report["runs"] if run["name"].startswith(RAW_ONE_CORE)]
        beside = [run for run in report["runs"] if run["name"].startswith(RAW_BESIDE_LOAD)]
        assert len(idle) == len(beside) == 1 and idle[0]["slices"] == measured["slices"] == 1
        assert summary["raw_cpu_us_per_operation"] in [run["cpu_us_per_operation"] for run in idle]
        assert summary["efficiency_against_raw_beside_busy_cores"] > 0 and summary["raw_cpu_us_beside_busy_cores"] > 0


def _server_run(name: str, keys_per_s: float, **fields: Any) -> dict[str, Any]:
    return {"name": name, "kind": "server", "keys_per_s": keys_per_s, "requests_per_s": keys_per_s, "seconds": 1.0,
            "client_cpu_s": 0.5, "server_cpu_us_per_request": None, **fields}


def _raw_run(name: str, keys_per_s: float, cpu_us: float | None = None) -> dict[str, Any]:
    return {"name": name, "kind": "raw", "keys_per_s": keys_per_s, "cpu_us_per_operation": cpu_us}


def test_summary_of_rounds_takes_each_series_median_and_reports_every_round() -> None:
    """Three rounds on two CPUs, each series' median in another round (raw: #3, peak: #1, floor: #2, the one-core
    efficiency: #3), so that taking the first, the middle or the last run of a series gets a figure wrong."""
    peak, floor = "platform (2 workers)", "floor (leanest Python endpoint)"
    runs = [
        _raw_run("raw 2 threads #1", 100.0), _server_run(f"{peak} #1", 90.0), _server_run(f"{floor} #1", 80.0),
        _raw_run("raw 2 threads #2", 300.0), _server_run(f"{peak} #2", 50.0), _server_run(f"{floor} #2", 70.0),
        _raw_run("raw 2 threads #3", 200.0), _server_run(f"{peak} #3", 120.0), _server_run(f"{floor} #3", 60.0),
        _raw_run("raw 1 thread", 60.0),
        _server_run("platform at 80% of peak", 72.0, latency_ms={"p99": 12.5}, rate=72.0),
        _server_run("native", 45.0), _server_run("batch of 100", 900.0), _server_run("platform (1 worker)", 40.0),
    ]
    for round_, (idle_us, busy_us, server_us) in enumerate(((1000.0, 1100.0, 2000.0), (1000.0, 1200.0, 4000.0),
                                                            (1000.0, 1300.0, 2500.0)), start=1):
        runs += [_raw_run(f"{RAW_ONE_CORE} #{round_}", 50.0, idle_us),
                 _raw_run(f"{RAW_BESIDE_LOAD} #{round_}", 50.0, busy_us),
                 _server_run(f"{ONE_CORE} #{round_}", 30.0, server_cpu_us_per_unwrap=server_us,
                             busiest_thread_us_per_unwrap=server_us * 0.8, server_processes=1,
                             one_process_per_core=True)]
    summary = summarize({"machine": {"cpus": 2}, "runs": runs}, project_cores=16)

    assert summary["round_ratios"] == [0.9, 0.167, 0.6]  # each round's peak over that round's raw, in order
    assert summary["server_over_raw"] == 0.45  # median peak (90, #1) over median raw (200, #3)
    assert summary["server_over_raw_without_client"] == 0.6  # 0.5 of 2 cores drove the load: 90 / (200 * 0.75)
    assert summary["floor_over_raw"] == 0.35 and summary["server_over_floor"] == 1.286  # median floor: 70, #2
    assert summary["workers_2_over_1"] == 2.25 and summary["raw_threads_over_1"] == 3.333
    assert summary["batch_over_single"] == 10.0 and summary["native_over_platform"] == 0.5
    assert summary["p99_ms_at_80_percent"] == 12.5 and summary["rate_at_80_percent"] == 72.0
    # CPU: every round's efficiency, lowest first; the figures quoted are the median round's (#3: 1000 / 2500).
    assert summary["round_efficiencies"] == [0.25, 0.4, 0.5]
    assert summary["efficiency"] == 0.4 and summary["cpu_run"] == f"{ONE_CORE} #3"
    assert summary["raw_cpu_us_per_operation"] == 1000.0 and summary["server_cpu_us_per_unwrap"] == 2500.0
    assert summary["busiest_thread_us_per_unwrap"] == 2000.0 and summary["projected_16_cores_over_raw"] > 0
    # Against raw on the server's core beside busy ones: the median of 0.55, 0.3 and 0.52, and the median raw CPU.
    assert summary["efficiency_against_raw_beside_busy_cores"] == 0.52
    assert summary["raw_cpu_us_beside_busy_cores"] == 1200.0


def test_busy_cores_spin_outside_this_process_tree_and_stop() -> None:
    """The neighbours raw is measured beside: one spinning interpreter per core, pinned there, left out of this
    process's CPU figures (not its descendants), and gone afterwards."""
    import contextlib
    import os
    import time
    from pathlib import Path

    from lkm.bench.cpu import process_tree
    from lkm.bench.spawn import busy_cores

    core = min(os.sched_getaffinity(0))
    # Its own spinners: another test's (the suite's, run by a parallel worker) may spin meanwhile.
    with busy_cores({core}) as started:
        spinners = [pid for pid in started if b"while True" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(spinners) == 1
        assert os.sched_getaffinity(spinners[0]) == {core}
        assert spinners[0] not in process_tree(os.getpid())
        ticks = int(Path(f"/proc/{spinners[0]}/stat").read_text().rsplit(")", 1)[1].split()[11])
        time.sleep(0.3)
        assert int(Path(f"/proc/{spinners[0]}/stat").read_text().rsplit(")", 1)[1].split()[11]) > ticks  # spins
    time.sleep(0.1)
    with contextlib.suppress(FileNotFoundError):  # killed: gone, or a zombie until its new parent reaps it
        assert Path(f"/proc/{spinners[0]}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
