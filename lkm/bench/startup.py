"""Start-up and footprint with years of rotated keys: `lkm bench startup --keys 5000`.

A dev environment is made in a temporary directory; the server is started once with its single key and once
more after the store has grown to `keys` keys, measuring each time the seconds from process start to /readyz
answering 200, the resident memory once ready, and unwrap latency with the active key (so the cost of many
keys on every request, if any, shows). Generating thousands of RSA-3072 keys would take many minutes, so a
few real keys are generated and the rest are sealed copies of them under new ids, written by the file store's
own sealing code: every file is a valid key that the server must read, parse and could unwrap with.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from lkm.bench.load import LoadPlan
from lkm.bench.measure import measure_server
from lkm.bench.report import new_report
from lkm.bench.spawn import Spawned, dev_target, spawn_server
from lkm.keys import Algorithm, KeyRecord, KeyState, generate_private_key, new_key_id, public_der_pkcs1, utcnow

REAL_KEYS = 4


def grow_file_store(config: Path, total: int, *, real_keys: int = REAL_KEYS) -> float:
    """Adds retired keys until the store holds `total`; returns the seconds it took."""
    from lkm import fsutil  # noqa: PLC0415
    from lkm.config import load_settings  # noqa: PLC0415
    from lkm.keystore.file import FileKeyStore  # noqa: PLC0415

    started = time.perf_counter()
    settings = load_settings(config)
    assert settings.keystore.path is not None and settings.keystore.passphrase is not None
    store = FileKeyStore(settings.keystore.path, settings.keystore.passphrase.read_bytes())
    try:
        missing = total - len(store.list_keys())
        originals = [generate_private_key() for _ in range(min(real_keys, max(missing, 0)))]
        now = utcnow()
        for n in range(max(missing, 0)):
            key = originals[n % len(originals)]
            key_id = new_key_id()
            created = now - timedelta(hours=missing - n)
            record = KeyRecord(id=key_id, state=KeyState.RETIRED, created=created, updated=created,
                               public_key_der=public_der_pkcs1(key.public_key()), backend=store.backend,
                               label=f"bench {n}")
            path = store.keys_dir / f"{key_id}.json"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(store.key_file_bytes(record, key))  # the store's own sealing, bound to the id
        fsutil.fsync_dir(store.keys_dir)
        store.refresh()
        sample = random.choice(store.list_keys())  # noqa: S311 - a sample, not a secret
        probe = os.urandom(32)
        from lkm.keys import PADDINGS  # noqa: PLC0415

        wrapped = sample.public_key.encrypt(probe, PADDINGS[Algorithm.RSA_OAEP_SHA1])
        if store.decrypt(sample.id, wrapped, Algorithm.RSA_OAEP_SHA1) != probe:
            raise RuntimeError("a synthetic key does not unwrap")
    finally:
        store.close()
    return time.perf_counter() - started


async def _latency(dev_dir: Path, spawned: Spawned, seconds: float) -> dict[str, Any]:
    plan = LoadPlan(concurrency=1, duration=seconds, warmup=0.5)
    return await measure_server(dev_target(dev_dir, spawned), plan, route="platform", padding="oaep-sha1",
                                batch_size=1, name="latency")


def _measure(dev_dir: Path, keys: int, latency_seconds: float) -> dict[str, Any]:
    config = dev_dir / "lkm.yaml"
    with spawn_server(config) as spawned:
        rss = spawned.rss_bytes()
        latency = asyncio.run(_latency(dev_dir, spawned, latency_seconds))
    return {"keys": keys, "ready_s": round(spawned.ready_seconds, 3), "rss_mib": round(rss / 2**20, 1),
            "unwrap_p50_ms": latency["latency_ms"]["p50"], "unwrap_p99_ms": latency["latency_ms"]["p99"],
            "unwrap_errors": latency["errors"]["total"]}


def run_startup(*, keys: int, latency_seconds: float = 3.0) -> dict[str, Any]:
    from lkm.devmode import ensure_dev_environment  # noqa: PLC0415

    report = new_report()
    with tempfile.TemporaryDirectory(prefix="lkm-bench-startup-") as tmp:
        dev_dir = Path(tmp) / "dev"
        ensure_dev_environment(dev_dir, port_base=0)
        small = _measure(dev_dir, 1, latency_seconds)
        grow_seconds = grow_file_store(dev_dir / "lkm.yaml", keys)
        large = _measure(dev_dir, keys, latency_seconds)
    per_thousand = (large["rss_mib"] - small["rss_mib"]) / max(keys - 1, 1) * 1000
    report["startup"] = {"runs": [small, large], "synthetic_store_seconds": round(grow_seconds, 2),
                         "rss_mib_per_1000_keys": round(per_thousand, 2)}
    report["notes"] = [
        f"start-up to ready: {small['ready_s']} s with 1 key, {large['ready_s']} s with {keys} keys",
        f"memory: {small['rss_mib']} MiB with 1 key, {large['rss_mib']} MiB with {keys} keys: "
        f"{per_thousand:.2f} MiB per 1,000 keys (private keys load on first use and are not counted)",
        f"unwrap p50 {small['unwrap_p50_ms']} ms with 1 key, {large['unwrap_p50_ms']} ms with {keys} keys"]
    return report
