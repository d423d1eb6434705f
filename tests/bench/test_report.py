"""Report arithmetic of lkm bench."""

from __future__ import annotations

import pytest

from lkm.bench.report import cpu_comparison, percentile


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0 and percentile(values, 0.99) == 99.0 and percentile(values, 1) == 100.0
    assert percentile([], 0.5) == 0.0 and percentile([7.0], 0.99) == 7.0


def test_cpu_comparison_sets_the_server_against_raw_of_the_same_run() -> None:
    raw = {"cpu_us_per_operation": 700.0}
    server = {"server_cpu_us_per_unwrap": 875.0, "busiest_thread_us_per_unwrap": 875.0, "server_processes": 2,
              "one_process_per_core": True}
    figures = cpu_comparison(raw, server, cores=16)
    assert figures is not None and figures["efficiency"] == 0.8
    assert figures["projected_over_raw"] == pytest.approx(0.8)
    # One process that does not grow with the cores: its busiest thread caps it on 16 cores.
    alone = cpu_comparison(raw, {**server, "server_processes": 1, "one_process_per_core": False}, cores=16)
    assert alone is not None and alone["projected_over_raw"] == pytest.approx((1 / 875) / (16 / 700), abs=1e-3)
    assert cpu_comparison({"cpu_us_per_operation": None}, server, cores=16) is None
