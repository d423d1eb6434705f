"""An operator's session with the real CLI while the real server runs: rotations, unwraps with every key,
disable (seen by the server without a restart), destruction refused before its time, and the dry run."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import pytest

from lkm.keys import KeyState
from tests.conftest import Running, b64, wrap
from tests.lkmcli import lkm_here


async def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(lkm_here, *args, check=check)


@pytest.mark.slow
async def test_operator_session(running: Running) -> None:
    config = str(running.config_path)
    a = json.loads((await cli("keys", "create", "--json", "-c", config)).stdout)
    assert a["state"] == "active"
    b = json.loads((await cli("keys", "rotate", "--json", "-c", config)).stdout)
    c = json.loads((await cli("keys", "rotate", "--json", "-c", config)).stdout)
    assert b["state"] == c["state"] == "active"
    running.store.refresh()
    assert {k.id: k.state for k in running.store.list_keys()} == {
        a["id"]: KeyState.RETIRED, b["id"]: KeyState.RETIRED, c["id"]: KeyState.ACTIVE}

    unwrapper = running.native("unwrapper")
    for key in (a, b, c):
        record = running.store.get_key(key["id"])
        reply = await unwrapper.unwrap(record.id, wrap(record, b"u" * 32))
        assert reply.status == 200 and reply.body["key"] == b64(b"u" * 32), key["id"]

    out = (await cli("keys", "disable", a["id"], "-c", config)).stdout
    assert out.startswith(f"{a['id']}: retired -> disabled")
    old = running.store.get_key(a["id"])
    deadline = time.monotonic() + 5
    while True:  # the server's refresh loop picks the change up; no restart
        reply = await unwrapper.unwrap(old.id, wrap(old, b"u" * 32))
        if reply.status != 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert reply.status == 409 and reply.body["error"]["code"] == "key_disabled"

    short = await cli("keys", "schedule-destruction", a["id"], "--days", "3", "-c", config, check=False)
    assert short.returncode == 1 and "7 to 3650 days" in short.stderr
    scheduled = (await cli("keys", "schedule-destruction", a["id"], "--days", "7", "-c", config)).stdout
    assert "disabled -> pending_destruction; may be destroyed after" in scheduled

    early = await cli("keys", "destroy", a["id"], "-c", config, check=False)
    assert early.returncode == 1 and "refused: the waiting period ends" in early.stderr
    assert "[FAIL] waiting period passed" in early.stdout
    running.store.refresh()
    assert running.store.get_key(a["id"]).state is KeyState.PENDING_DESTRUCTION  # nothing destroyed
    dry = await cli("keys", "destroy", a["id"], "--dry-run", "-c", config, check=False)
    assert dry.returncode == 1 and "dry run: destruction would be refused" in dry.stdout
    last = next(line for line in dry.stdout.splitlines() if "last unwrap:" in line)
    assert last.split("last unwrap: ")[1].startswith("20")  # a time, found in the audit trail
    active_dry = await cli("keys", "destroy", c["id"], "--dry-run", "-c", config, check=False)
    assert "[FAIL] not active: state is active" in active_dry.stdout

    await cli("keys", "cancel-destruction", a["id"], "-c", config)
    assert (await cli("keys", "enable", a["id"], "-c", config)).stdout.startswith(f"{a['id']}: disabled -> retired")
    refused = await cli("keys", "disable", c["id"], "-c", config, check=False)
    assert refused.returncode == 1 and "cannot go from active to disabled without force" in refused.stderr

    audit = running.audit_lines()
    announced = {e["intent"] for e in audit if e["outcome"] == "intent"}
    assert announced == {e["intent"] for e in audit if e["outcome"] != "intent" and "intent" in e}
    cli_actions = [(e["action"], e["outcome"]) for e in audit
                   if e["actor"]["kind"] == "cli" and e["outcome"] != "intent"]
    assert cli_actions == [
        ("create_key", "ok"), ("rotate_key", "ok"), ("rotate_key", "ok"), ("disable_key", "ok"),
        ("schedule_destruction", "error"), ("schedule_destruction", "ok"), ("destroy_key", "error"),
        ("destroy_key_dry_run", "ok"), ("destroy_key_dry_run", "ok"), ("cancel_destruction", "ok"),
        ("enable_key", "ok"), ("disable_key", "error")]
    verify = await cli("audit", "verify", str(running.server.settings.audit.path))
    assert "chain intact" in verify.stdout
