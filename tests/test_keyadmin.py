"""Scheduled rotation in the real server: a missed rotation at start, rotation while running, and two server
processes sharing one key store that must not both rotate for the same period."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from lkm.config import load_settings
from lkm.hawk_credentials import mint_credential
from lkm.keys import KeyRecord, KeyState, utcnow
from lkm.keystore.file import FileKeyStore
from tests.conftest import Pki, eventually, start_server, vector_key

OLD_ID = "3f0c8c1e-6a55-4a4e-9a0e-2b8f2f1f6d11"


def open_store(config: Path) -> FileKeyStore:
    settings = load_settings(config)
    assert settings.keystore.path is not None and settings.keystore.passphrase is not None
    return FileKeyStore(settings.keystore.path, settings.keystore.passphrase.read_bytes())


def overdue_key(store: FileKeyStore, age: timedelta) -> KeyRecord:
    key = vector_key(0)
    record = store.import_key(OLD_ID, key, state=KeyState.ACTIVE)
    return store.save_record(record.with_changes(created=utcnow() - age))


def rotations(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # A server that announced a rotation and then found another had made it records that nothing changed.
    return [e for e in events if e.get("action") == "rotate_key" and e["outcome"] == "ok" and not e.get("unchanged")]


@pytest.mark.slow
async def test_missed_rotation_happens_at_start_and_the_schedule_keeps_rotating(
        tmp_path: Path, certs: Pki, config_factory: Callable[..., Path]) -> None:
    config = config_factory(rotation={"every": "1h"})
    store = open_store(config)
    overdue_key(store, timedelta(hours=3))  # the server was down when this key's rotation was due
    store.close()
    async with start_server(tmp_path, certs, config) as running:
        [event] = await eventually(lambda: rotations(running.audit_lines()))
        first = running.store.get_key(event["key_id"])
        assert first.state is KeyState.ACTIVE and running.store.get_key(OLD_ID).state is KeyState.RETIRED
        assert event["actor"]["kind"] == "system" and event["scheduled"] is True
        assert event["route"] == "scheduler" and event["previous_active"] == OLD_ID
        metrics = running.server.metrics.registry
        assert metrics.get_sample_value("lkm_rotations_total", {"outcome": "ok"}) == 1
        assert metrics.get_sample_value("lkm_rotation_period_seconds") == 3600

        # While running: the period passes (the clock moved by making the key older), the schedule rotates.
        running.store.save_record(first.with_changes(created=utcnow() - timedelta(minutes=61)))
        assert await eventually(lambda: len(rotations(running.audit_lines())) == 2)
        states = sorted(k.state.value for k in running.store.list_keys())
        assert states == ["active", "retired", "retired"]
        assert metrics.get_sample_value("lkm_rotations_total", {"outcome": "ok"}) == 2


@pytest.mark.slow
@pytest.mark.long(5)
def test_two_servers_sharing_a_store_rotate_once_per_period(tmp_path: Path,
                                                           config_factory: Callable[..., Path]) -> None:
    # Two servers of two worker processes each: four schedulers look at the same store.
    config = config_factory(rotation={"every": "1h"}, **{"limits.workers": 2})
    settings = load_settings(config)
    assert settings.platform.hawk.credentials_file is not None
    mint_credential(settings.platform.hawk.credentials_file, "platform-test")
    store = open_store(config)
    fresh = overdue_key(store, timedelta(minutes=1))  # not due yet
    servers = [subprocess.Popen([sys.executable, "-m", "lkm", "serve", "-c", str(config)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for proc in servers:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("lkm serving"), (line, proc.stderr.read() if proc.stderr else "")
        # Both servers are up and looking at the schedule. Make the key overdue while holding the store's lock
        # for a moment: both see the rotation due and queue for the lock; the loser must find the winner's key.
        with store.lock():
            store.save_record(fresh.with_changes(created=utcnow() - timedelta(hours=2)))
            time.sleep(1.5)
        deadline = time.monotonic() + 20
        while len(list((tmp_path / "keys" / "keys").glob("*.json"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # several more looks by both servers (every 0.2 s)
        assert all(proc.poll() is None for proc in servers)
        store.refresh()
        assert sorted(k.state.value for k in store.list_keys()) == ["active", "retired"]
        audit = [json.loads(line) for line in settings.audit.path.read_text().splitlines()]
        assert len(rotations(audit)) == 1
    finally:
        store.close()
        for proc in servers:
            proc.send_signal(signal.SIGTERM)
        for proc in servers:
            try:
                proc.communicate(timeout=20)
            finally:
                if proc.poll() is None:
                    proc.kill()
