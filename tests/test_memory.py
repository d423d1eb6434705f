"""Memory given back after a burst: real allocations, real resident-memory readings."""

from __future__ import annotations

import gc

import pytest

from lkm.memory import MemoryReleaser, resident_bytes


@pytest.mark.slow
def test_cyclic_garbage_from_a_burst_is_collected_and_the_heap_trimmed() -> None:
    MemoryReleaser(threshold_bytes=0).step()  # start from a trimmed heap, whatever ran before in this process
    releaser = MemoryReleaser(threshold_bytes=16 * 1024 * 1024, min_interval=0.0)
    releaser.start()
    assert releaser.step() == 0  # nothing grew

    gc.disable()
    try:
        for _ in range(800):  # 64 kB buffers held only by reference cycles, like a failed request's traceback
            holder: list[object] = [bytearray(64 * 1024)]
            holder.append(holder)
        del holder
        assert resident_bytes() - releaser.baseline >= 16 * 1024 * 1024
        released = releaser.step()
    finally:
        gc.enable()
    assert releaser.releases == 1 and released >= 16 * 1024 * 1024
    assert resident_bytes() - releaser.baseline < 16 * 1024 * 1024
