"""The ceiling: the key store's own private-key operation, in this process, on N threads, with no server.

Besides the rate, the CPU the operations took (from /proc, not wall time): the yardstick for a server's CPU per
unwrap in the same run.

This is the same `KeyStore.decrypt` the server's workers call, on the same kind of pre-wrapped data keys, so
the ratio server/raw is what lkm's HTTP, TLS, authentication, audit and metrics cost on top. `cryptography`
releases the GIL during the RSA operation, so threads scale up to the number of cores. On the PKCS#11 store,
each thread runs a timed loop of python-pkcs11 decrypts inside one of the store's sessions (worker processes),
so raw is the token's own rate with no pipe round trip per operation; use as many threads as `pool_size`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lkm.bench.cpu import snapshot, usage
from lkm.bench.requests import make_pool
from lkm.keys import Algorithm, KeyState
from lkm.keystore import UNWRAPPABLE_STATES, DecryptLoop, KeyStore


@dataclass(frozen=True)
class RawResult:
    threads: int
    seconds: float
    operations: int
    cpu_seconds: float | None = None  # CPU of this process (and a PKCS#11 store's token workers) meanwhile

    @property
    def cpu_us_per_operation(self) -> float | None:
        if self.cpu_seconds is None or not self.operations:
            return None
        return self.cpu_seconds / self.operations * 1e6

    @property
    def ops_per_second(self) -> float:
        return self.operations / self.seconds if self.seconds > 0 else 0.0


def combined_raw(parts: Sequence[RawResult]) -> RawResult:
    """Slices of one raw measurement, as one: their operations over their seconds and CPU."""
    cpu = [part.cpu_seconds for part in parts]
    return RawResult(threads=parts[0].threads, seconds=sum(part.seconds for part in parts),
                     operations=sum(part.operations for part in parts),
                     cpu_seconds=None if None in cpu else sum(c for c in cpu if c is not None))


def pick_key(store: KeyStore, key_id: str | None) -> str:
    """The given key, else the newest active key, else the newest key that can unwrap."""
    if key_id is not None:
        return store.get_key(key_id).id
    keys = [k for k in store.list_keys() if k.state in UNWRAPPABLE_STATES]
    if not keys:
        raise ValueError("the key store has no key that can unwrap; create one or pass --key-id")
    active = [k for k in keys if k.state is KeyState.ACTIVE] or keys
    return max(active, key=lambda k: k.created).id


@contextlib.contextmanager
def temporary_store() -> Iterator[KeyStore]:
    """A fresh file key store with one generated key, deleted afterwards: raw speed without any set-up."""
    from lkm.keystore.file import FileKeyStore  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="lkm-bench-") as tmp:
        store = FileKeyStore(Path(tmp) / "keystore", secrets.token_bytes(32))
        try:
            store.create_key(state=KeyState.ACTIVE, label="bench")
            yield store
        finally:
            store.close()


def run_raw(store: KeyStore, key_id: str, algorithm: Algorithm, *, threads: int, duration: float,
            warmup: float = 0.5) -> RawResult:
    """Counts the private-key operations all threads complete inside the measured window."""
    record = store.get_key(key_id)
    pool = make_pool(key_id, record.public_key_der, algorithm, 64)
    if store.decrypt(key_id, pool.ciphertexts[0], algorithm) != pool.plaintexts[0]:  # also loads the key
        raise RuntimeError("the key store unwrapped a test key to the wrong value")
    start = time.perf_counter() + warmup
    stop = start + duration
    counts = [0] * threads
    failures: list[BaseException] = []

    in_session = store if isinstance(store, DecryptLoop) else None  # PKCS#11: loop in a session

    def work_in_session(slot: int) -> None:
        assert in_session is not None
        try:
            in_session.decrypt_loop(key_id, pool.ciphertexts, algorithm, max(start - time.perf_counter(), 0.0))
            counts[slot] = in_session.decrypt_loop(key_id, pool.ciphertexts, algorithm, duration)
        except BaseException as exc:
            failures.append(exc)

    def work(slot: int) -> None:
        done = 0
        index = slot
        size = len(pool.ciphertexts)
        try:
            while True:
                store.decrypt(key_id, pool.ciphertexts[index % size], algorithm)
                index += 1
                now = time.perf_counter()
                if now >= stop:
                    break
                if now >= start:
                    done += 1
        except BaseException as exc:  # reported by the caller, not lost in a thread
            failures.append(exc)
        counts[slot] = done

    target = work_in_session if in_session is not None else work
    workers = [threading.Thread(target=target, args=(i,), name=f"lkm-bench-raw-{i}") for i in range(threads)]
    for worker in workers:
        worker.start()
    # CPU over the measured window, from /proc as for a server: every thread of this process and of a store's
    # worker processes (a server or floor this process started is left out).
    time.sleep(max(start - time.perf_counter(), 0.0))
    before = snapshot(os.getpid(), skip_servers=True)
    time.sleep(max(stop - time.perf_counter(), 0.0))
    after = snapshot(os.getpid(), skip_servers=True)
    for worker in workers:
        worker.join()
    if failures:
        raise failures[0]
    return RawResult(threads=threads, seconds=duration, operations=sum(counts),
                     cpu_seconds=usage(before, after).seconds)
