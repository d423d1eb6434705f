"""A small client for both of lkm's APIs: the platform's Hawk route and the native mTLS API.

Used by `lkm demo`, the benchmark and the tests; it speaks exactly what the platform speaks.
"""

from __future__ import annotations

import base64
import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDictProxy

from lkm.hawk import HawkCredential, sign_request


def client_ssl_context(ca_file: Path | str | None, cert: Path | str | None = None,
                       key: Path | str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


@dataclass(frozen=True)
class Reply:
    status: int
    body: dict[str, Any]
    headers: CIMultiDictProxy[str]


class PlatformClient:
    """Plays the platform: Hawk-signed calls to the registered decrypt URL."""

    def __init__(self, session: aiohttp.ClientSession, decrypt_url: str, credential: HawkCredential,
                 ssl_context: ssl.SSLContext | None) -> None:
        self.ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else False
        self.session = session
        self.url = decrypt_url
        self.credential = credential
        parts = urlsplit(decrypt_url)
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.path = parts.path

    def _auth(self, method: str, resource: str, body: bytes | None, content_type: str | None) -> str:
        return sign_request(self.credential, method=method, resource=resource, host=self.host, port=self.port,
                            content_type=content_type, body=body)

    async def decrypt(self, keypair_id: str, wrapped: bytes, *, pkcs1: bool = False,
                      user_id: str | None = None) -> Reply:
        body = json.dumps({"keypairId": keypair_id, "body": base64.b64encode(wrapped).decode()}).encode()
        resource = self.path + ("?decryptType=pkcs1" if pkcs1 else "")
        headers = {"Content-Type": "application/json",
                   "Authorization": self._auth("POST", resource, body, "application/json")}
        if user_id:
            headers["PureCloud-User-Id"] = user_id
        return await self._send("POST", self.url + ("?decryptType=pkcs1" if pkcs1 else ""), body, headers)

    async def options(self) -> Reply:
        headers = {"Authorization": self._auth("OPTIONS", self.path, None, None)}
        return await self._send("OPTIONS", self.url, None, headers)

    async def _send(self, method: str, url: str, body: bytes | None, headers: dict[str, str]) -> Reply:
        async with self.session.request(method, url, data=body, headers=headers, ssl=self.ssl) as resp:
            raw = await resp.read()
            try:
                parsed = json.loads(raw) if raw else {}
            except ValueError:
                parsed = {"raw": raw.decode("utf-8", "replace")}
            return Reply(resp.status, parsed if isinstance(parsed, dict) else {"list": parsed},
                         resp.headers)


class NativeClient:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, ssl_context: ssl.SSLContext) -> None:
        self.session = session
        self.base = base_url.rstrip("/")
        self.ssl = ssl_context

    async def request(self, method: str, path: str, payload: Any = None) -> Reply:
        data = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        async with self.session.request(method, self.base + path, data=data, headers=headers,
                                        ssl=self.ssl) as resp:
            raw = await resp.read()
            parsed = json.loads(raw) if raw else {}
            return Reply(resp.status, parsed, resp.headers)

    async def unwrap(self, key_id: str, wrapped: bytes, algorithm: str = "RSA-OAEP-SHA1") -> Reply:
        return await self.request("POST", f"/v1/keys/{key_id}/unwrap",
                                  {"wrapped_key": base64.b64encode(wrapped).decode(), "algorithm": algorithm})
