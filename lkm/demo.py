"""`lkm demo`: plays the platform once against a running dev server, end to end."""

from __future__ import annotations

import base64
import json
import os
import secrets
from pathlib import Path
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lkm.client import NativeClient, PlatformClient, client_ssl_context
from lkm.devmode import DEV_JSON
from lkm.errors import CliError
from lkm.hawk import HawkCredential
from lkm.keys import PADDINGS, Algorithm, KeyState, load_public_pkcs1

OAEP_SHA1 = PADDINGS[Algorithm.RSA_OAEP_SHA1]


def dev_json_path(dev_json: Path | None, config: str | None, dev_dir: Path) -> Path:
    """--dev-json, else dev.json beside the config (-c or LKM_CONFIG), else in --dev-dir."""
    if dev_json is not None:
        return dev_json
    if config:
        return Path(config).resolve().parent / DEV_JSON
    return dev_dir / DEV_JSON


def load_dev_facts(path: Path) -> dict[str, Any]:
    try:
        facts: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise CliError(f"{path}: no such file; start the dev server (`lkm serve --dev`), or point at its "
                       f"directory with --dev-dir DIR or -c DIR/lkm.yaml", status=2) from None
    except ValueError:
        raise CliError(f"{path}: not the dev.json that `lkm serve --dev` writes", status=2) from None
    return facts


async def current_active_key(native: NativeClient) -> str:
    """The key the server has active now: rotations and disables since start-up count."""
    reply = await native.request("GET", "/v1/keys")
    if reply.status != 200:
        raise CliError(f"listing the keys failed: {reply.status} {reply.body}")
    active = [k["id"] for k in reply.body["keys"] if k.get("state") == KeyState.ACTIVE.value]
    if not active:
        raise CliError("the server has no active key; make one with `lkm keys rotate` (or `lkm keys enable ID`)")
    return str(active[-1])


async def run_demo(dev_json: Path) -> int:
    facts = load_dev_facts(dev_json)
    admin = facts["clients"]["reader"]
    async with aiohttp.ClientSession() as session:
        native = NativeClient(session, facts["listeners"]["native"]["url"],
                              client_ssl_context(facts["ca_file"], admin["cert"], admin["key"]))
        key_id = await current_active_key(native)
        reply = await native.request("GET", f"/v1/keys/{key_id}")
        if reply.status != 200:
            print(f"fetching the public key failed: {reply.status} {reply.body}")
            return 1
        public_key = load_public_pkcs1(base64.b64decode(reply.body["public_key_pkcs1_b64"]))
        print(f"1. fetched public key of {key_id} over mTLS")
        dek = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(12)
        recording = b"RIFF....a call recording " + secrets.token_bytes(32)
        sealed = AESGCM(dek).encrypt(nonce, recording, None)
        wrapped = public_key.encrypt(dek, OAEP_SHA1)
        print(f"2. encrypted a recording with a fresh AES-256 key; wrapped the key (RSA-OAEP-SHA1, "
              f"{len(wrapped)} bytes)")
        credential = HawkCredential(id=facts["hawk"]["id"], key=facts["hawk"]["key"])
        platform = PlatformClient(session, facts["listeners"]["platform"]["decrypt_url"], credential,
                                  client_ssl_context(facts["ca_file"]))
        answer = await platform.decrypt(key_id, wrapped, user_id="00000000-0000-4000-8000-000000000001")
        if answer.status != 200:
            print(f"unwrap failed: {answer.status} {answer.body}")
            return 1
        unwrapped = base64.b64decode(answer.body["body"])
        played = AESGCM(unwrapped).decrypt(nonce, sealed, None)
        ok = played == recording
        print(f"3. unwrapped over Hawk on the platform route: {answer.status}; recording decrypts: {ok}")
        return 0 if ok else 1
