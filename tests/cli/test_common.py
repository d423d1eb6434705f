"""lkm.cli.common: every change the command line makes is announced in the audit trail before it is made.

The attack: kill -9 a command at a random point, many times, and look for a key or a credential in the store that
has no audit record. Before intents, `backup restore`, `keys rotate` and `hawk create` all left some.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lkm.config import Settings, load_settings
from lkm.hawk_credentials import load_credentials_file
from lkm.keys import KeyRecord, KeyState
from lkm.keystore.open import open_keystore
from tests.conftest import seed_keystore
from tests.lkmcli import LKM, lkm, lkm_here

KILLS = int(os.environ.get("LKM_CRASH_KILLS", "6"))  # LKM_CRASH_KILLS=200 for a long hunt
PASSPHRASE = "correct horse battery staple backup"


def records(audit: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []


def kill_at_random(args: list[str], longest: float, rng: random.Random, changed: Callable[[], bool],
                   env: dict[str, str] | None = None) -> None:
    """Starts `lkm ARGS` and kill -9s it (it may finish first): every other time after a random delay up to
    `longest`, else the moment `changed()` sees its change in the store: the narrow window between a change and
    a record written after it, which random delays rarely hit."""
    proc = subprocess.Popen([*LKM, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **(env or {})})
    if rng.random() < 0.5:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=rng.uniform(0.0, longest))
    else:
        deadline = time.monotonic() + 4 * longest
        while proc.poll() is None and not changed() and time.monotonic() < deadline:
            time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def signature(*paths: Path) -> Callable[[], bool]:
    """True once any of `paths` (files or directories) changed since this call."""
    def now() -> list[tuple[int, int]]:
        return [(st.st_mtime_ns, st.st_size) if (st := _stat(p)) else (0, 0) for p in paths]

    before = now()
    return lambda: now() != before


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


def timed(run: Callable[[], object]) -> float:
    began = time.monotonic()
    run()
    return time.monotonic() - began


def key_ids_with_records(events: list[dict[str, Any]]) -> set[str]:
    return {e["key_id"] for e in events if isinstance(e.get("key_id"), str)}


def _keys_in(settings: Settings) -> list[KeyRecord]:
    store = open_keystore(settings.keystore)  # opening the store cleans up, as a start does
    try:
        return store.list_keys()
    finally:
        store.close()


def temps(*directories: Path) -> list[str]:
    return [p.name for d in directories for p in d.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
@pytest.mark.long(7)
def test_no_change_survives_a_crash_without_its_record(tmp_path: Path,
                                                        config_factory: Callable[..., Path]) -> None:
    rng = random.Random(int(os.environ.get("LKM_CRASH_SEED", "14")))
    config = str(config_factory())
    settings = load_settings(config)
    audit = settings.audit.path
    keys_dir = settings.keystore.path
    hawk_file = settings.platform.hawk.credentials_file
    assert hawk_file is not None and keys_dir is not None

    # hawk create: every credential in the file has a record naming it.
    longest = timed(lambda: lkm("hawk", "create", "first", "-c", config))
    for n in range(KILLS):
        kill_at_random(["hawk", "create", f"cred-{n}", "-c", config], longest, rng, signature(hawk_file))
    lkm_here("hawk", "create", "last", "-c", config)  # the next run cleans what a killed one left
    announced = {e.get("hawk_id") for e in records(audit) if e["action"] == "hawk_create"}
    assert set(load_credentials_file(hawk_file)) <= announced
    assert temps(hawk_file.parent) == []

    # keys rotate: every key in the store (each new one, and the retirement of the one before) has its record.
    longest = timed(lambda: lkm("keys", "rotate", "-c", config))
    for _ in range(KILLS):
        kill_at_random(["keys", "rotate", "-c", config], longest, rng, signature(Path(keys_dir) / "keys"))
    in_store = _keys_in(settings)
    assert {k.id for k in in_store} <= key_ids_with_records(
        [e for e in records(audit) if e["action"] == "rotate_key"])
    # A rotation killed between activating its key and retiring the one before leaves both active (the newest
    # is used), never none; the next activation retires every other.
    assert 1 <= sum(k.state is KeyState.ACTIVE for k in in_store) <= 2
    assert temps(Path(keys_dir), Path(keys_dir) / "keys") == []
    lkm_here("keys", "rotate", "-c", config)
    assert sum(k.state is KeyState.ACTIVE for k in _keys_in(settings)) == 1

    # backup restore: each key restored has its record, written since this restore began.
    bundle = tmp_path / "bundle.lkmb"
    env = {"LKM_BACKUP_PASSPHRASE": PASSPHRASE}
    lkm_here("backup", "create", str(bundle), "-c", config, env=env)
    fresh = tmp_path / "fresh"
    shutil.copytree(Path(config).parent, fresh, ignore=shutil.ignore_patterns("keys", "audit", "hawk.json*"))
    fresh_config = fresh / "lkm.yaml"
    fresh_config.write_text(Path(config).read_text().replace(str(tmp_path) + "/", str(fresh) + "/"))
    fresh_settings = load_settings(fresh_config)
    fresh_keys = fresh_settings.keystore.path
    assert fresh_keys is not None
    seed_keystore(fresh_keys)
    longest = timed(lambda: lkm("backup", "restore", str(bundle), "-c", str(fresh_config), env=env))
    for _ in range(KILLS):
        shutil.rmtree(fresh_keys)
        since = len(records(fresh_settings.audit.path))
        seed_keystore(fresh_keys)  # an empty store with the tests' scrypt cost, as every test server's
        kill_at_random(["backup", "restore", str(bundle), "-c", str(fresh_config)], longest, rng,
                       signature(fresh_keys / "keys"), env)
        restored = {k.id for k in _keys_in(fresh_settings)}
        recorded = key_ids_with_records([e for e in records(fresh_settings.audit.path)[since:]
                                         if e["action"] == "restore_key"])
        assert restored <= recorded, restored - recorded
        assert temps(Path(fresh_keys), Path(fresh_keys) / "keys") == []

    # The chains are whole; what was cut off between an intent and its outcome is listed (exit status 3).
    for trail in (audit, fresh_settings.audit.path):
        verified = lkm_here("audit", "verify", str(trail), check=False)
        assert verified.returncode in (0, 3), verified.stdout
        assert "chain intact" in verified.stdout
