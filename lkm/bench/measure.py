"""One measured run, as a report entry: the server under load, or the key store's raw rate; or both, in slices.

Shared by `lkm bench`, `lkm bench startup` and `lkm bench suite`, which import it (never each other).

Why slices: on a shared virtual machine the neighbours move even the CPU that one RSA operation costs, and
hold each level for seconds; a raw run of 5 s and a server run of 5 s after it then compare two different
machines. `measure_in_slices` alternates the two every second or so and adds each side up, so that a
neighbour's burst falls on both (the README's "Why slices" has the figures).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

from lkm.bench.cpu import snapshot
from lkm.bench.load import LoadPlan, LoadResult, combined_load, run_load
from lkm.bench.raw import RawResult, combined_raw, pick_key, run_raw
from lkm.bench.report import load_entry, raw_entry
from lkm.bench.requests import (
    PADDINGS,
    BatchRequests,
    NativeRequests,
    PlatformRequests,
    RequestSource,
    Target,
    fetch_public_key,
    make_pool,
)
from lkm.errors import TargetError
from lkm.keystore import KeyStore

POOL_SIZE = 256
SLICE_SECONDS = 1.0
"""About how long each slice of a sliced measurement lasts (see the module's doc)."""
SLICE_WARMUP_SECONDS = 0.3
"""Before each server slice but the first: time to open the connections again, left out of the figures."""
RAW_SLICE_WARMUP_SECONDS = 0.1


def request_source(target: Target, route: str, padding: str, key: tuple[str, bytes], *,
                   batch_size: int) -> RequestSource:
    key_id, public_key_der = key
    algorithm = PADDINGS[padding]
    if route == "platform":
        if not target.platform_url or target.hawk is None:
            raise TargetError("the platform route needs its URL (--url) and a Hawk credential "
                              "(--hawk-id, --hawk-key-file)")
        return PlatformRequests(target.platform_url, target.hawk, make_pool(key_id, public_key_der, algorithm,
                                                                              POOL_SIZE))
    if not target.native_url:
        raise TargetError("the native API needs its URL (--url or --native-url)")
    if route == "batch":
        size = max(POOL_SIZE, batch_size * 2)
        return BatchRequests(target.native_url, make_pool(key_id, public_key_der, algorithm, size), batch_size)
    return NativeRequests(target.native_url, make_pool(key_id, public_key_der, algorithm, POOL_SIZE))


async def measure_server(target: Target, plan: LoadPlan, *, route: str, padding: str, batch_size: int,
                         name: str | None = None, key: tuple[str, bytes] | None = None) -> dict[str, Any]:
    source = request_source(target, route, padding, key or await fetch_public_key(target), batch_size=batch_size)
    context = target.context(client_certificate=source.client_certificate)
    result = await run_load(source, plan, context, target.server_pid)
    return load_entry(name or route, result, plan, route=route, padding=padding,
                      batch_size=batch_size if route == "batch" else 1)


def measure_raw(store: KeyStore, key_id: str | None, padding: str, *, threads: int, duration: float,
                name: str = "raw") -> dict[str, Any]:
    result = run_raw(store, pick_key(store, key_id), PADDINGS[padding], threads=threads, duration=duration)
    return raw_entry(name, result, padding=padding)


@contextlib.contextmanager
def kept_to(cpus: set[int] | None) -> Iterator[None]:
    """Meanwhile, this thread (and the threads it starts) and every thread of this process's other descendants
    but a server and its own (a PKCS#11 store's token workers, which do a raw operation's work) on `cpus`; as
    before afterwards. Nothing moves without `cpus`."""
    if not cpus:
        yield
        return
    own = os.getpid()
    tasks = [0] + [tid for pid, tid in snapshot(own, skip_servers=True).threads if pid != own]
    before: dict[int, set[int]] = {}
    try:
        for task in tasks:
            with contextlib.suppress(OSError):  # a thread that has just ended
                before[task] = os.sched_getaffinity(task)
                os.sched_setaffinity(task, cpus)
        yield
    finally:
        for task, mask in before.items():
            with contextlib.suppress(OSError):
                os.sched_setaffinity(task, mask)


async def measure_in_slices(store: KeyStore, target: Target, plan: LoadPlan, *, key: tuple[str, bytes],
                            threads: int, raw_name: str, server_name: str, route: str = "platform",
                            padding: str = "oaep-sha1", batch_size: int = 1, raw_key_id: str | None = None,
                            raw_cpus: set[int] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The raw operation on `threads` threads and the server, alternating in slices of about `SLICE_SECONDS`
    over `plan.duration` each: (raw entry, server entry), each adding up its slices.

    Raw runs on `raw_key_id` (default: the server's key `key`, which `store` must hold), on `raw_cpus` (the
    server's own, for a server on one core); the load runs on the CPUs this process had before. The first server
    slice warms up for `plan.warmup`, the others only for `SLICE_WARMUP_SECONDS`, to open their connections
    again.
    """
    duration = plan.duration or 10.0
    slices = max(1, round(duration / SLICE_SECONDS))
    key_id = raw_key_id or pick_key(store, key[0])
    source = request_source(target, route, padding, key, batch_size=batch_size)  # its data keys wrapped once
    context = target.context(client_certificate=source.client_certificate)
    raws: list[RawResult] = []
    loads: list[LoadResult] = []
    for index in range(slices):
        with kept_to(raw_cpus):
            raws.append(run_raw(store, key_id, PADDINGS[padding], threads=threads, duration=duration / slices,
                                warmup=RAW_SLICE_WARMUP_SECONDS))
        warmup = plan.warmup if index == 0 else min(plan.warmup, SLICE_WARMUP_SECONDS)
        loads.append(await run_load(source, dataclasses.replace(plan, duration=duration / slices, warmup=warmup),
                                    context, target.server_pid))
    raw = raw_entry(raw_name, combined_raw(raws), padding=padding)
    served = load_entry(server_name, combined_load(loads), plan, route=route, padding=padding,
                        batch_size=batch_size if route == "batch" else 1)
    raw["slices"] = served["slices"] = slices
    return raw, served
