"""A stand-in for the platform's API, just enough of it to register keys the way Genesys Cloud does.

    POST /oauth/token                   client-credentials grant, HTTP Basic client id and secret
    POST /api/v2/recording/localkeys    {"configId", "publicKey", "keypairId"} under the bearer token; before
                                        answering, a Hawk-signed test decrypt of a fresh 32-byte secret wrapped
                                        with that public key goes to lkm's platform route (over TLS, trusting the
                                        test CA), and a wrong or failed unwrap fails the registration with 400

Knobs for the failure modes: `fail_next` (statuses to answer instead, one per registration call), `stall_seconds`
(hold every registration call that long: a timeout), and a wrong `hawk` credential (the test decrypt fails).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import os
import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from lkm.client import PlatformClient, client_ssl_context
from lkm.hawk import HawkCredential
from lkm.keys import load_public_pkcs1
from tests.conftest import OAEP_SHA1

CLIENT_ID = "lkm-test-client"
CLIENT_SECRET = "stand-in secret 0123456789"
CONFIG_ID = "6d1b6c2e-0f6a-4f8e-9d3c-1a2b3c4d5e6f"


@dataclass
class Registration:
    config_id: str
    keypair_id: str
    public_key: str
    test_decrypt_status: int


@dataclass
class StandinPlatform:
    ca_file: Path
    lkm_decrypt_url: str = ""
    hawk: HawkCredential | None = None
    fail_next: list[int] = field(default_factory=list)
    stall_seconds: float = 0.0
    calls: int = 0
    token_requests: int = 0
    registrations: list[Registration] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    _tokens: set[str] = field(default_factory=set)
    _runner: web.AppRunner | None = None
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _connected: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/oauth/token", self._token)
        app.router.add_post("/api/v2/recording/localkeys", self._localkeys)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def connect(self, lkm_decrypt_url: str, hawk: HawkCredential) -> None:
        """Where lkm's platform route is and the Hawk credential registered for it (known once lkm runs)."""
        self.lkm_decrypt_url, self.hawk = lkm_decrypt_url, hawk
        self._connected.set()

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def genesys_config(self, secret_file: Path, **overrides: Any) -> dict[str, Any]:
        secret_file.write_text(CLIENT_SECRET + "\n")
        config: dict[str, Any] = {"login_url": self.url, "api_url": self.url, "client_id": CLIENT_ID,
                                  "client_secret": {"file": str(secret_file)}, "config_id": CONFIG_ID,
                                  "timeout": 5, "max_attempts": 3, "retry_initial": 0.05, "retry_max": 0.2}
        config.update(overrides)
        return config

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self.token_requests += 1
        expected = "Basic " + base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        form = await request.post()
        if request.headers.get("Authorization") != expected or form.get("grant_type") != "client_credentials":
            return web.json_response({"error": "invalid_client", "description": "client not found"}, status=401)
        token = secrets.token_urlsafe(16)
        self._tokens.add(token)
        return web.json_response({"access_token": token, "token_type": "bearer", "expires_in": 86399})

    async def _localkeys(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[7:] not in self._tokens:
            return web.json_response({"message": "authentication required", "status": 401}, status=401)
        if self.stall_seconds:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release.wait(), self.stall_seconds)
            if self._release.is_set():  # shutting down: nobody waits for this answer any more
                return web.json_response({"message": "stopping", "status": 503}, status=503)
        if self.fail_next:
            status = self.fail_next.pop(0)
            return web.json_response({"message": "stand-in failure", "status": status}, status=status)
        body = await request.json()
        problem = self._check(body)
        if problem:
            self.refused.append(problem)
            return web.json_response({"message": problem, "status": 400}, status=400)
        status = await self._test_decrypt(body["keypairId"], body["publicKey"])
        if status != 200:
            self.refused.append(f"test decrypt answered {status}")
            return web.json_response({"message": "The local key manager service isn't ready", "status": 400},
                                     status=400)
        self.registrations.append(Registration(body["configId"], body["keypairId"], body["publicKey"], status))
        return web.json_response({"id": str(uuid.uuid4()), "keyConfigurationType": "LocalKeyManager",
                                  "createDate": "2026-01-01T00:00:00.000Z"})

    @staticmethod
    def _check(body: Any) -> str | None:
        if not isinstance(body, dict) or set(body) != {"configId", "publicKey", "keypairId"}:
            got = sorted(body) if isinstance(body, dict) else body
            return f"expected exactly configId, publicKey, keypairId; got {got}"
        if body["configId"] != CONFIG_ID:
            return "unknown key configuration"
        try:
            uuid.UUID(body["keypairId"])
            key = load_public_pkcs1(base64.b64decode(body["publicKey"], validate=True))
        except (ValueError, binascii.Error):
            return "publicKey must be base64 DER PKCS#1 and keypairId a UUID"
        if key.key_size != 3072:
            return "publicKey must be RSA-3072"
        return None

    async def _test_decrypt(self, keypair_id: str, public_b64: str) -> int:
        await asyncio.wait_for(self._connected.wait(), 10)  # lkm may register keys while it is starting
        assert self.hawk is not None and self.lkm_decrypt_url
        secret = os.urandom(32)
        wrapped = load_public_pkcs1(base64.b64decode(public_b64)).encrypt(secret, OAEP_SHA1)
        async with aiohttp.ClientSession() as session:
            client = PlatformClient(session, self.lkm_decrypt_url, self.hawk, client_ssl_context(self.ca_file))
            reply = await client.decrypt(keypair_id, wrapped)
        if reply.status != 200:
            return reply.status
        return 200 if base64.b64decode(reply.body.get("body", "")) == secret else 422
