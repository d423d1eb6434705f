"""The Hawk nonce table shared by the server processes of one host."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from lkm.nonces import SLOTS, NonceCache, NonceStore, SharedNonceCache, create_table


def test_a_nonce_seen_through_one_mapping_is_refused_through_another(tmp_path: Path) -> None:
    create_table(tmp_path / "nonces", 1000)
    first, second = SharedNonceCache(tmp_path / "nonces", 300), SharedNonceCache(tmp_path / "nonces", 300)
    try:
        assert first.check_and_remember("platform", "n1", 1000, 1000.0)
        assert not second.check_and_remember("platform", "n1", 1000, 1001.0)
        assert not first.check_and_remember("platform", "n1", 1000, 1002.0)
        assert second.check_and_remember("platform", "n1", 1001, 1002.0)  # another ts is another request
        assert second.check_and_remember("other", "n1", 1000, 1002.0)  # and another credential
    finally:
        first.close()
        second.close()


def test_an_expired_nonce_frees_its_slot(tmp_path: Path) -> None:
    create_table(tmp_path / "nonces", 1)
    cache = SharedNonceCache(tmp_path / "nonces", 300)
    for i in range(SLOTS):
        assert cache.check_and_remember("p", f"n{i}", 1000, 1000.0)
    assert cache.overflow_evictions == 0
    # After the window the ts check refuses a replay; the table may forget it and make room.
    assert cache.check_and_remember("p", "fresh", 1400, 1400.0)
    assert cache.overflow_evictions == 0
    cache.close()


def test_a_full_bucket_drops_its_oldest_entry(tmp_path: Path) -> None:
    create_table(tmp_path / "nonces", 1)  # one bucket
    cache = SharedNonceCache(tmp_path / "nonces", 300)
    for i in range(SLOTS):
        assert cache.check_and_remember("p", f"n{i}", 1000 + i, 1000.0 + i)
    assert cache.check_and_remember("p", "one more", 1010, 1010.0)
    assert cache.overflow_evictions == 1
    assert cache.check_and_remember("p", "n0", 1000, 1010.0)  # the oldest went
    assert not cache.check_and_remember("p", "n7", 1007, 1010.0)
    cache.close()


def test_a_file_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    (tmp_path / "nonces").write_bytes(b"x" * 10)
    with pytest.raises(ValueError, match="not a nonce table"):
        SharedNonceCache(tmp_path / "nonces", 300)


def test_both_caches_are_nonce_stores(tmp_path: Path) -> None:
    create_table(tmp_path / "nonces", 10)
    stores: list[NonceStore] = [NonceCache(10, 300), SharedNonceCache(tmp_path / "nonces", 300)]
    assert all(store.check_and_remember("p", "n", 5, 5.0) for store in stores)
    assert not any(store.check_and_remember("p", "n", 5, 6.0) for store in stores)


def test_nonce_cache_bound_evicts_oldest() -> None:
    cache = NonceCache(3, 300)
    for i in range(5):
        assert cache.check_and_remember("id", f"n{i}", 1000, 1000.0)
    assert len(cache) == 3
    assert cache.overflow_evictions == 2
    assert not cache.check_and_remember("id", "n4", 1000, 1000.0)
    assert not cache.check_and_remember("id", "n2", 1000, 1000.0)
    assert cache.check_and_remember("id", "n0", 1000, 1000.0)  # forgotten: evicted by the bound
    assert len(cache) == 3


def test_nonce_cache_expires_after_window() -> None:
    cache = NonceCache(100, 300)
    assert cache.check_and_remember("id", "a", 1000, 1000.0)
    assert cache.check_and_remember("id", "b", 1100, 1100.0)
    assert not cache.check_and_remember("id", "a", 1000, 1300.0)
    assert cache.check_and_remember("id", "c", 1301, 1301.0)
    assert len(cache) == 2  # "a" (expiry 1300) dropped, "b" and "c" kept
    assert cache.check_and_remember("id", "a", 1000, 1301.0)
    assert cache.overflow_evictions == 0
    with pytest.raises(ValueError):
        NonceCache(0, 300)


def test_nonce_cache_threads_agree_on_one_winner() -> None:
    cache = NonceCache(10_000, 300)
    results: list[bool] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        for j in range(200):
            first = cache.check_and_remember("id", "shared", 1000, 1000.0)
            own = cache.check_and_remember("id", f"{i}-{j}", 1000, 1000.0)
            with lock:
                results.extend([first, own])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3200
    assert results.count(True) == 1600 + 1
    assert len(cache) == 1601
