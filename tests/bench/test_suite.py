"""`lkm bench suite`: every measurement of the README's table runs and is reported (never speed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lkm import cli


@pytest.mark.slow
@pytest.mark.long
def test_suite_runs_every_measurement_of_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["bench", "suite", "--dev-dir", str(tmp_path / "dev"), "--duration", "0.3", "--warmup", "0",
                       "--concurrency", "2", "--keys", "0", "--rounds", "2", "--json"])
    assert status == 0
    report = json.loads(capsys.readouterr().out)
    names = [run["name"] for run in report["runs"]]
    cpus = report["machine"]["cpus"]
    for tag in (" #1", " #2"):
        assert f"raw {cpus} threads{tag}" in names and f"floor (leanest Python endpoint){tag}" in names
    assert "platform at 80% of peak" in names and "batch of 100" in names and "native, new connection, resumed" in names
    served = [run for run in report["runs"] if run["kind"] == "server"]
    assert all(run["errors"]["mismatch"] == 0 and run["requests"] > 0 for run in served), served
    assert all(run["errors"]["total"] == 0 for run in served if "#" in run["name"]), served  # closed loop
    summary = report["summary"]
    assert len(summary["round_ratios"]) == 2
    assert summary["server_over_raw"] > 0 and summary["floor_over_raw"] > 0 and summary["p99_ms_at_80_percent"] > 0
    # CPU per unwrap from /proc: the one-core server where there are two cores, against raw of the same rounds
    assert summary["server_cpu_us_per_unwrap"] > 0 and summary["raw_cpu_us_per_operation"] > 0
    assert summary["efficiency"] > 0 and summary["projected_16_cores_over_raw"] > 0
    measured = next(run for run in report["runs"] if run["name"] == summary["cpu_run"])
    assert "lkm-loop" in measured["threads_us_per_unwrap"] and "lkm-audit" in measured["threads_us_per_unwrap"]
    if cpus > 1:
        assert summary["cpu_run"].startswith("platform (1 process on 1 core, RSA inline)")
        assert "lkm-rsa" not in measured["threads_us_per_unwrap"]  # inline: no worker threads
        # The yardstick: raw beside idle cores; raw on the server's core beside busy ones is shown too.
        idle = [run for run in report["runs"] if run["name"].startswith("raw 1 thread, generator's cores")]
        beside = [run for run in report["runs"] if run["name"].startswith("raw 1 thread, server's core, ")]
        assert len(idle) == len(beside) == 2
        assert summary["raw_cpu_us_per_operation"] in [run["cpu_us_per_operation"] for run in idle]
        assert summary["efficiency_against_raw_beside_busy_cores"] > 0 and summary["raw_cpu_us_beside_busy_cores"] > 0


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
    before = set(process_tree(1))
    with busy_cores({core}):
        spinners = [pid for pid in set(process_tree(1)) - before
                    if b"while True" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(spinners) == 1
        assert os.sched_getaffinity(spinners[0]) == {core}
        assert spinners[0] not in process_tree(os.getpid())
        ticks = int(Path(f"/proc/{spinners[0]}/stat").read_text().rsplit(")", 1)[1].split()[11])
        time.sleep(0.3)
        assert int(Path(f"/proc/{spinners[0]}/stat").read_text().rsplit(")", 1)[1].split()[11]) > ticks  # spins
    time.sleep(0.1)
    with contextlib.suppress(FileNotFoundError):  # killed: gone, or a zombie until its new parent reaps it
        assert Path(f"/proc/{spinners[0]}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
