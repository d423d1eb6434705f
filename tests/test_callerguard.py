"""Rate limits, `lkm freeze`/`lkm unfreeze` and the volume breaker against the real server and CLI."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests.conftest import Pki, Running, start_server, wrap
from tests.lkmcli import lkm_here


async def until(check: Callable[[], Awaitable[bool]], within: float = 15.0) -> bool:
    """Awaits `check` until it holds (a change made by the CLI reaches the server within refresh_seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def metrics_text(running: Running) -> str:
    async with running.session.get(running.url("ops") + "/metrics") as resp:
        return await resp.text()


@pytest.mark.slow
async def test_a_caller_over_its_rate_gets_429_with_retry_after(tmp_path: Path, certs: Pki,
                                                                config_factory: Callable[..., Path]) -> None:
    config = config_factory(**{"limits.rate_limits": {"per_second": 0.5, "burst": 3,
                                                      "callers": [{"id": "admin", "per_second": 1000}]}})
    async with start_server(tmp_path, certs, config) as running:
        record = running.create_key()
        await running.server.refresh()
        platform = running.platform()
        statuses = [(await platform.decrypt(record.id, wrap(record, b"p" * 32))) for _ in range(5)]
        assert [r.status for r in statuses] == [200, 200, 200, 429, 429]
        refused = statuses[-1]
        assert refused.body == {"message": "rate limit exceeded for this caller", "status": 429}
        assert int(refused.headers["Retry-After"]) >= 1
        native = running.native("unwrapper")
        replies = [await native.unwrap(record.id, wrap(record, b"n" * 32)) for _ in range(4)]
        assert [r.status for r in replies] == [200, 200, 200, 429]
        assert replies[-1].body["error"]["code"] == "rate_limited" and replies[-1].headers["Retry-After"]
        # A caller with a limit of its own is not held to the default.
        admin = running.native("admin")
        assert {(await admin.unwrap(record.id, wrap(record, b"a" * 32))).status for _ in range(6)} == {200}
        text = await metrics_text(running)
        assert 'lkm_rate_limited_total{caller="hawk:platform-test"} 2.0' in text


@pytest.mark.slow
async def test_freeze_and_unfreeze_through_the_cli(running: Running) -> None:
    record = running.create_key()
    await running.server.refresh()
    config = str(running.config_path)
    platform, native = running.platform(), running.native("unwrapper")
    assert (await platform.decrypt(record.id, wrap(record, b"f" * 32))).status == 200
    lkm_here("-c", config, "freeze", "platform-test", "--reason", "suspected leak")
    lkm_here("-c", config, "freeze", "unwrapper")
    listed = lkm_here("-c", config, "freeze", "--list").stdout
    assert "platform-test\tstop\tby operator" in listed and "suspected leak" in listed and "unwrapper" in listed

    async def refused() -> bool:
        reply = await platform.decrypt(record.id, wrap(record, b"f" * 32))
        return reply.status == 403
    assert await until(refused)
    reply = await platform.decrypt(record.id, wrap(record, b"f" * 32))
    assert reply.body == {"message": "this caller is frozen; an operator must unfreeze it", "status": 403}
    frozen = await native.unwrap(record.id, wrap(record, b"f" * 32))
    assert frozen.status == 403 and frozen.body["error"]["code"] == "caller_frozen"
    # Others are not touched.
    assert (await running.native("admin").unwrap(record.id, wrap(record, b"f" * 32))).status == 200

    lkm_here("-c", config, "unfreeze", "platform-test")
    assert lkm_here("-c", config, "unfreeze", "platform-test", check=False).returncode == 1

    async def served() -> bool:
        return (await platform.decrypt(record.id, wrap(record, b"f" * 32))).status == 200
    assert await until(served)
    trail = [e for e in running.audit_lines() if e["action"] in ("freeze_caller", "unfreeze_caller")]
    assert [(e["action"], e["outcome"], e["caller"]) for e in trail] == [
        ("freeze_caller", "intent", "platform-test"), ("freeze_caller", "ok", "platform-test"),
        ("freeze_caller", "intent", "unwrapper"), ("freeze_caller", "ok", "unwrapper"),
        ("unfreeze_caller", "intent", "platform-test"), ("unfreeze_caller", "ok", "platform-test"),
        ("unfreeze_caller", "intent", "platform-test"), ("unfreeze_caller", "error", "platform-test")]
    assert lkm_here("-c", config, "audit", "verify", check=False).returncode == 0


@pytest.mark.slow
async def test_the_breaker_freezes_a_caller_whose_volume_jumps(tmp_path: Path, certs: Pki,
                                                                config_factory: Callable[..., Path]) -> None:
    config = config_factory(**{"limits.breaker": {"action": "freeze", "window": "10s", "warmup": 0, "floor": 8,
                                                  "factor": 2}})
    async with start_server(tmp_path, certs, config) as running:
        record = running.create_key()
        await running.server.refresh()
        platform = running.platform()
        statuses = [(await platform.decrypt(record.id, wrap(record, b"b" * 32))).status for _ in range(12)]
        # The 8th unwrap in the window trips the breaker: it is still served, then the caller is frozen.
        assert statuses == [200] * 8 + [403] * 4, statuses
        assert 'lkm_unwrap_volume_anomaly{caller="hawk:platform-test"} 1.0' in await metrics_text(running)
        listed = lkm_here("-c", str(running.config_path), "freeze", "--list").stdout
        assert "platform-test\tstop\tby breaker" in listed
        trail = [e for e in running.audit_lines() if e["action"] == "freeze_caller"]
        assert [(e["outcome"], e["by"], e["actor"]["kind"]) for e in trail] == [("intent", "breaker", "system"),
                                                                                 ("ok", "breaker", "system")]
        lkm_here("-c", str(running.config_path), "unfreeze", "platform-test")

        async def served() -> bool:
            return (await platform.decrypt(record.id, wrap(record, b"b" * 32))).status in (200,)
        assert await until(served)
