"""One measured run, as a report entry: the server under load, or the key store's raw rate.

Shared by `lkm bench`, `lkm bench startup` and `lkm bench suite`, which import it (never each other).
"""

from __future__ import annotations

from typing import Any

from lkm.bench.load import LoadPlan, run_load
from lkm.bench.raw import pick_key, run_raw
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
