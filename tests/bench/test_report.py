"""Report arithmetic of lkm bench."""

from __future__ import annotations

from lkm.bench.report import percentile


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0 and percentile(values, 0.99) == 99.0 and percentile(values, 1) == 100.0
    assert percentile([], 0.5) == 0.0 and percentile([7.0], 0.99) == 7.0
