"""Thread names that the OS (and lkm bench) sees."""

from __future__ import annotations

import threading
from pathlib import Path

from lkm.threadnames import name_this_thread, thread_kind


def test_a_thread_gets_its_name_in_proc_cut_to_the_kernel_limit() -> None:
    seen: list[str] = []

    def run() -> None:
        name_this_thread()
        seen.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip())
        name_this_thread("lkm-a-very-long-thread-name")
        seen.append(Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip())

    thread = threading.Thread(target=run, name="lkm-rsa-7")
    thread.start()
    thread.join()
    assert seen == ["lkm-rsa-7", "lkm-a-very-long"]


def test_thread_kind_drops_the_counter() -> None:
    assert thread_kind("lkm-rsa-3") == "lkm-rsa" and thread_kind("lkm-io_0") == "lkm-io"
    assert thread_kind("lkm-loop") == "lkm-loop" and thread_kind("42") == "42"
