"""The real CLI and the real `lkm serve --dev`, as an operator would run them.

The dev-mode tests and `serve` run `lkm` in child processes; the key and credential commands' own tests call
the same `lkm.cli.main` in this process (`lkm_here`), which spares an interpreter start per command."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from lkm.client import NativeClient, PlatformClient, client_ssl_context
from lkm.hawk import HawkCredential
from lkm.keys import load_public_pkcs1
from tests.conftest import OAEP_SHA1, VECTORS, KeyPool
from tests.lkmcli import lkm_here

LKM = [sys.executable, "-m", "lkm"]


def lkm(*args: str, check: bool = True, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*LKM, *args], capture_output=True, text=True, check=False, timeout=120,
                            input=stdin.decode() if stdin else None)
    if check and result.returncode != 0:
        raise AssertionError(f"lkm {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


def start_dev(dev_dir: Path, *extra: str) -> Iterator[dict[str, object]]:
    proc = subprocess.Popen([*LKM, "serve", "--dev", "--dev-dir", str(dev_dir), "--dev-port-base", "0", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dev_json = dev_dir / "dev.json"
    deadline = time.monotonic() + 60
    while not dev_json.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"dev server did not start: {out}\n{err}")
        time.sleep(0.1)
    time.sleep(0.2)
    facts = json.loads(dev_json.read_text())
    facts["_proc"] = proc
    yield facts
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == 0


@pytest.fixture
def dev_server(tmp_path: Path) -> Iterator[dict[str, object]]:
    yield from start_dev(tmp_path / "dev")


@pytest.mark.slow
@pytest.mark.long(6)
def test_dev_mode_on_softhsm(tmp_path: Path) -> None:
    from tests.hsm import require_softhsm

    require_softhsm()
    env_before = os.environ.get("SOFTHSM2_CONF")
    gen = start_dev(tmp_path / "dev", "--keystore", "pkcs11")
    facts = next(gen)
    try:
        config = Path(str(facts["config"]))
        assert "type: pkcs11" in config.read_text()
        demo = lkm_here("demo", "--dev-json", str(config.parent / "dev.json"))
        assert "recording decrypts: True" in demo.stdout
        # The CLI finds the token through the config alone (module_env carries SOFTHSM2_CONF).
        listing = subprocess.run([*LKM, "keys", "list", "-c", str(config)], capture_output=True, text=True,
                                 check=False, env={k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"})
        assert listing.returncode == 0, listing.stderr
        assert "active" in listing.stdout
    finally:
        for _ in gen:
            pass
    assert os.environ.get("SOFTHSM2_CONF") == env_before


@pytest.mark.slow
async def test_dev_mode_end_to_end(dev_server: dict[str, object]) -> None:
    facts = dev_server
    config = str(facts["config"])
    # dev.json holds what scripts need.
    assert {"platform", "native", "ops"} <= set(facts["listeners"])  # type: ignore[arg-type]
    assert set(facts["clients"]) == {"admin", "unwrapper", "reader"}  # type: ignore[arg-type]
    assert Path(str(facts["config"])).exists() and Path(str(facts["ca_file"])).exists()

    demo = lkm("demo", "--dev-json", str(Path(config).parent / "dev.json"))
    assert "recording decrypts: True" in demo.stdout

    # A key created by the CLI is served by the running server within seconds, without a restart.
    created = json.loads(lkm("keys", "create", "-c", config, "--json").stdout)
    hawk = facts["hawk"]
    async with aiohttp.ClientSession() as session:
        platform = PlatformClient(session, facts["listeners"]["platform"]["decrypt_url"],  # type: ignore[index]
                                  HawkCredential(id=hawk["id"], key=hawk["key"]),  # type: ignore[index]
                                  client_ssl_context(str(facts["ca_file"])))
        wrapped = load_public_pkcs1(base64.b64decode(created["public_key_pkcs1_b64"])).encrypt(b"n" * 32, OAEP_SHA1)
        deadline = time.monotonic() + 5
        while True:
            reply = await platform.decrypt(created["id"], wrapped)
            if reply.status == 200 or time.monotonic() > deadline:
                break
            await __import__("asyncio").sleep(0.2)
        assert reply.status == 200 and base64.b64decode(reply.body["body"]) == b"n" * 32

        # A Hawk credential minted by the CLI is accepted without a restart.
        minted = json.loads(lkm("hawk", "create", "second-cred", "-c", config, "--json").stdout)
        second = PlatformClient(session, platform.url, HawkCredential(id=minted["id"], key=minted["key"]),
                                platform.ssl if not isinstance(platform.ssl, bool) else None)
        deadline = time.monotonic() + 5
        while True:
            reply = await second.options()
            if reply.status == 200 or time.monotonic() > deadline:
                break
            await __import__("asyncio").sleep(0.2)
        assert reply.status == 200

        admin = facts["clients"]["admin"]  # type: ignore[index]
        native = NativeClient(session, facts["listeners"]["native"]["url"],  # type: ignore[index]
                              client_ssl_context(str(facts["ca_file"]), admin["cert"], admin["key"]))
        # Each worker process picks the new key up on its own refresh: every one within seconds.
        deadline = time.monotonic() + 5
        while True:
            listing = await native.request("GET", "/v1/keys")
            listed = {k["id"] for k in listing.body["keys"]}
            if listed >= {created["id"], facts["active_key"]} or time.monotonic() > deadline:
                break
            await __import__("asyncio").sleep(0.2)
        assert listed >= {created["id"], facts["active_key"]}
        async with session.get(facts["listeners"]["ops"]["url"] + "/readyz") as resp:  # type: ignore[index]
            assert resp.status == 200, await resp.text()

    verify = lkm("audit", "verify", str(Path(config).parent / "audit.log"))
    assert "chain intact" in verify.stdout


@pytest.mark.slow
def test_second_dev_start_reuses_the_environment(tmp_path: Path) -> None:
    from lkm.devmode import ensure_dev_environment

    first = ensure_dev_environment(tmp_path / "dev", port_base=0)
    stamp = first.stat().st_mtime_ns
    keys = sorted(os.listdir(tmp_path / "dev" / "keystore" / "keys"))
    assert ensure_dev_environment(tmp_path / "dev", port_base=0) == first
    assert first.stat().st_mtime_ns == stamp
    assert sorted(os.listdir(tmp_path / "dev" / "keystore" / "keys")) == keys


@pytest.fixture
def config(tmp_path: Path, config_factory) -> str:  # type: ignore[no-untyped-def]
    return str(config_factory())


@pytest.mark.slow
def test_keys_create_list_show(config: str) -> None:
    created = json.loads(lkm_here("keys", "create", "-c", config, "--json").stdout)
    assert created["state"] == "active"
    assert created["public_key_pkcs1_b64"].startswith("MIIBigKCAYEA")
    second = json.loads(lkm_here("keys", "create", "-c", config, "--json").stdout)
    assert second["state"] == "pending_activation"  # one active key; `lkm keys activate` or a rotation promotes
    listing = lkm_here("keys", "list", "-c", config).stdout
    assert created["id"] in listing and second["id"] in listing and "active" in listing
    shown = lkm_here("keys", "show", created["id"], "-c", config).stdout
    assert created["public_key_pkcs1_b64"] in shown and "BEGIN PUBLIC KEY" in shown
    missing = lkm_here("keys", "show", "00000000-0000-4000-8000-000000000000", "-c", config, check=False)
    assert missing.returncode == 1 and "key_not_found" in missing.stderr


@pytest.mark.slow
@pytest.mark.parametrize("form", ["pem-pkcs1", "pem-pkcs8", "der", "sample-b64"])
def test_keys_import_forms(config: str, tmp_path: Path, form: str, key_pool: KeyPool) -> None:
    key = key_pool.take()
    encodings = {
        "pem-pkcs1": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()),
        "pem-pkcs8": key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()),
        "der": key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()),
        "sample-b64": base64.b64encode(key.private_bytes(serialization.Encoding.DER,
                                                         serialization.PrivateFormat.TraditionalOpenSSL,
                                                         serialization.NoEncryption())),
    }
    path = tmp_path / "key.in"
    path.write_bytes(encodings[form])
    key_id = "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"
    out = lkm_here("keys", "import", "--id", key_id.upper(), str(path), "-c", config).stdout
    assert key_id in out
    again = lkm_here("keys", "import", "--id", key_id, str(path), "-c", config)  # identical material: fine
    assert again.returncode == 0
    other = tmp_path / "other.pem"
    other.write_bytes(key_pool.take().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    clash = lkm_here("keys", "import", "--id", key_id, str(other), "-c", config, check=False)
    assert clash.returncode == 1 and "different key material" in clash.stderr


@pytest.mark.slow
def test_keys_import_refuses_wrong_keys(config: str, tmp_path: Path) -> None:
    small = tmp_path / "small.pem"
    small.write_bytes(rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    result = lkm_here("keys", "import", "--id", "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0", str(small), "-c", config,
                 check=False)
    assert result.returncode == 1 and "RSA-2048" in result.stderr
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello")
    result = lkm_here("keys", "import", "--id", "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0", str(junk), "-c", config,
                 check=False)
    assert result.returncode == 1 and "not a readable private key" in result.stderr


@pytest.mark.slow
def test_import_sample_vectors_keep_their_ids(config: str, tmp_path: Path) -> None:
    for i, vector in enumerate(VECTORS["vectors"]):
        path = tmp_path / f"v{i}.b64"
        path.write_text(vector["private_key_pkcs1_der_b64"])
        key_id = f"{i:08d}-0000-4000-8000-000000000000"
        lkm_here("keys", "import", "--id", key_id, str(path), "-c", config)
    ids = [k["id"] for k in json.loads(lkm_here("keys", "list", "-c", config, "--json").stdout)]
    assert sorted(ids) == [f"{i:08d}-0000-4000-8000-000000000000" for i in range(len(VECTORS["vectors"]))]


@pytest.mark.slow
def test_hawk_create_prints_once_and_refuses_duplicates(config: str) -> None:
    out = lkm_here("hawk", "create", "genesys-prod", "-c", config).stdout
    assert "apiId:  genesys-prod" in out and "apiKey: " in out
    dup = lkm_here("hawk", "create", "genesys-prod", "-c", config, check=False)
    assert dup.returncode == 1
    assert "genesys-prod" in lkm_here("hawk", "list", "-c", config).stdout
    assert "apiKey" not in lkm_here("hawk", "list", "-c", config).stdout


@pytest.mark.slow
def test_cli_changes_are_audited(config: str) -> None:
    created = json.loads(lkm_here("keys", "create", "-c", config, "--json").stdout)
    audit_path = Path(config).parent / "audit" / "audit.log"
    events = [json.loads(line) for line in audit_path.read_text().splitlines()]
    assert events[-1]["action"] == "create_key" and events[-1]["key_id"] == created["id"]
    assert events[-1]["actor"]["kind"] == "cli"
    assert "chain intact" in lkm_here("audit", "verify", str(audit_path)).stdout


@pytest.mark.slow
def test_serve_refuses_open_key_directory(config: str, tmp_path: Path) -> None:
    lkm_here("keys", "create", "-c", config)
    os.chmod(tmp_path / "keys", 0o755)
    result = subprocess.run([*LKM, "serve", "-c", config], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "expected no access for group or others" in result.stderr
