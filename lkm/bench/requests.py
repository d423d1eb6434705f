"""What the load generator sends: targets, pools of pre-wrapped keys, and the requests of each route.

Data keys are wrapped once, before the run, against the target key's public key, so the client spends its CPU
on sending rather than on RSA. Native and batch requests are then fixed bytes; platform requests need a fresh
Hawk header each (timestamp and nonce), which costs one HMAC: the payload hash is computed once per body.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import secrets
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from lkm import keys
from lkm.bench.http import Connection, ResumingContext
from lkm.errors import TargetError
from lkm.hawk import HawkCredential, calculate_mac, normalized_string, payload_hash
from lkm.keys import Algorithm, b64, load_public_pkcs1

PADDINGS: dict[str, Algorithm] = {
    "oaep-sha1": Algorithm.RSA_OAEP_SHA1,
    "pkcs1": Algorithm.RSA_PKCS1_V1_5,
    "oaep-sha256": Algorithm.RSA_OAEP_SHA256,
}
DATA_KEY_BYTES = 32


@dataclass(frozen=True)
class Target:
    """Where a running lkm listens and how to call it; from a dev.json or from explicit options."""

    platform_url: str | None = None  # the full decrypt URL
    native_url: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    hawk: HawkCredential | None = None
    key_id: str | None = None
    public_key_der: bytes | None = None
    server_pid: int | None = None
    config: str | None = None  # the server's config file, for --raw on the same key store

    @classmethod
    def from_dev_json(cls, path: Path) -> Target:
        try:
            facts: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise TargetError(f"cannot read {path} ({exc}); start `lkm serve --dev` or pass --url etc.") from None
        listeners = facts.get("listeners", {})
        hawk = facts.get("hawk") or {}
        client = (facts.get("clients") or {}).get("admin") or {}
        pid = facts.get("pid")
        return cls(platform_url=(listeners.get("platform") or {}).get("decrypt_url"),
                   native_url=(listeners.get("native") or {}).get("url"),
                   ca_file=facts.get("ca_file"), cert_file=client.get("cert"), key_file=client.get("key"),
                   hawk=HawkCredential(hawk["id"], hawk["key"]) if hawk.get("id") and hawk.get("key") else None,
                   key_id=facts.get("active_key"), server_pid=pid if isinstance(pid, int) else None,
                   config=facts.get("config"))

    def context(self, *, client_certificate: bool) -> ResumingContext:
        ctx = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
        if self.ca_file:
            ctx.load_verify_locations(cafile=self.ca_file)
        else:
            ctx.load_default_certs()
        if client_certificate:
            if not (self.cert_file and self.key_file):
                raise TargetError("the native API needs a client certificate: pass --cert and --key")
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    path: str
    query: str
    tls: bool

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise TargetError(f"not an http(s) URL: {url!r}")
        tls = parts.scheme == "https"
        return cls(parts.hostname, parts.port or (443 if tls else 80), parts.path or "/", parts.query, tls)

    @property
    def host_header(self) -> str:
        default = 443 if self.tls else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Pool:
    """Data keys wrapped under one public key: the ciphertexts and what each must unwrap to."""

    key_id: str
    algorithm: Algorithm
    ciphertexts: list[bytes]
    plaintexts: list[bytes] = field(repr=False)


def make_pool(key_id: str, public_key_der: bytes, algorithm: Algorithm, size: int) -> Pool:
    public_key = load_public_pkcs1(public_key_der)
    plaintexts = [os.urandom(DATA_KEY_BYTES) for _ in range(size)]
    return Pool(key_id, algorithm, [public_key.encrypt(p, keys.PADDINGS[algorithm]) for p in plaintexts], plaintexts)


async def fetch_public_key(target: Target) -> tuple[str, bytes]:
    """The target key's id and public key (DER PKCS#1), asked of the native API when not given."""
    if target.key_id and target.public_key_der:
        return target.key_id, target.public_key_der
    if not target.native_url:
        raise TargetError("to wrap test keys, pass --public-key (and --key-id), or a native URL with a "
                          "client certificate that has the read role")
    endpoint = Endpoint.parse(target.native_url)
    conn = await Connection.open(endpoint.host, endpoint.port,
                                 target.context(client_certificate=True) if endpoint.tls else None)
    try:
        key_id = target.key_id
        if key_id is None:
            listing = await _get_json(conn, endpoint, "/v1/keys")
            active = [k for k in listing.get("keys", []) if k.get("state") == "active"]
            if not active:
                raise TargetError("the server has no active key; pass --key-id")
            key_id = str(max(active, key=lambda k: str(k.get("created")))["id"])
        record = await _get_json(conn, endpoint, f"/v1/keys/{key_id}")
        return key_id, base64.b64decode(record["public_key_pkcs1_b64"])
    finally:
        await conn.wait_closed()


async def _get_json(conn: Connection, endpoint: Endpoint, path: str) -> dict[str, Any]:
    response = await conn.exchange(f"GET {path} HTTP/1.1\r\nHost: {endpoint.host_header}\r\n\r\n".encode())
    if response.status != 200:
        raise TargetError(f"GET {path} answered {response.status}: {response.body[:200]!r}")
    data: dict[str, Any] = json.loads(response.body)
    return data


# --- requests ------------------------------------------------------------------------------------------------

class RequestSource(Protocol):
    """Builds request n (cheaply) and checks an answer against what the data key must unwrap to."""

    endpoint: Endpoint
    keys_per_request: int
    client_certificate: bool

    def build(self, n: int, close: bool) -> tuple[bytes, int]:
        """The request bytes and the index to pass to `check`."""
        ...

    def check(self, index: int, body: bytes) -> bool: ...


def _head(method: str, endpoint: Endpoint, path: str, length: int) -> str:
    return (f"{method} {path} HTTP/1.1\r\nHost: {endpoint.host_header}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n")


class PlatformRequests:
    """The platform's call: `POST {decrypt URL}` with `{"keypairId", "body"}`, Hawk-signed with a payload hash."""

    keys_per_request = 1
    client_certificate = False

    def __init__(self, url: str, credential: HawkCredential, pool: Pool) -> None:
        if pool.algorithm not in (Algorithm.RSA_OAEP_SHA1, Algorithm.RSA_PKCS1_V1_5):
            raise TargetError("the platform route knows only oaep-sha1 and pkcs1; use --route native for others")
        self.endpoint = Endpoint.parse(url)
        self.credential = credential
        resource = self.endpoint.path + (f"?{self.endpoint.query}" if self.endpoint.query else "")
        if pool.algorithm is Algorithm.RSA_PKCS1_V1_5:
            resource += ("&" if "?" in resource else "?") + "decryptType=pkcs1"
        self.resource = resource
        self.host = self.endpoint.host.lower()
        # A nonce per request built, not per request number: a run numbers its requests from 0, and a source used
        # for several runs (the slices of lkm.bench.measure) would otherwise sign the same nonce again, which the
        # server rightly refuses as a replay.
        self.nonce_prefix = secrets.token_hex(4)
        self._nonces = itertools.count()
        self.bodies = [json.dumps({"keypairId": pool.key_id, "body": b64(c)}).encode() for c in pool.ciphertexts]
        self.hashes = [payload_hash("application/json", body) for body in self.bodies]
        self.heads = [_head("POST", self.endpoint, resource, len(body)).encode() for body in self.bodies]
        self.expected = [b64(p) for p in pool.plaintexts]

    def build(self, n: int, close: bool) -> tuple[bytes, int]:
        index = n % len(self.bodies)
        ts = str(int(time.time()))
        nonce = f"{self.nonce_prefix}{next(self._nonces):x}"
        hash_ = self.hashes[index]
        mac = calculate_mac(self.credential.key, normalized_string(ts, nonce, "POST", self.resource, self.host,
                                                                   self.endpoint.port, hash_, None))
        auth = f'Authorization: Hawk id="{self.credential.id}", ts="{ts}", nonce="{nonce}", hash="{hash_}", ' \
               f'mac="{mac}"\r\n'
        return b"".join((self.heads[index], auth.encode(), b"Connection: close\r\n\r\n" if close else b"\r\n",
                         self.bodies[index])), index

    def check(self, index: int, body: bytes) -> bool:
        return bool(json.loads(body).get("body") == self.expected[index])


class _FixedRequests:
    """Requests that are fixed bytes, prepared once per body with and without `Connection: close`."""

    client_certificate = True
    endpoint: Endpoint

    def _prepare(self, path: str, bodies: list[bytes], pool: Pool) -> None:
        heads = [_head("POST", self.endpoint, path, len(body)).encode() for body in bodies]
        self.requests = [head + b"\r\n" + body for head, body in zip(heads, bodies, strict=True)]
        self.closing = [head + b"Connection: close\r\n\r\n" + body for head, body in zip(heads, bodies, strict=True)]
        self.expected = [b64(p) for p in pool.plaintexts]

    def build(self, n: int, close: bool) -> tuple[bytes, int]:
        index = n % len(self.requests)
        return (self.closing if close else self.requests)[index], index


class NativeRequests(_FixedRequests):
    """`POST /v1/keys/{id}/unwrap` with `{"wrapped_key", "algorithm"}` over mutual TLS: fixed bytes."""

    keys_per_request = 1

    def __init__(self, url: str, pool: Pool) -> None:
        self.endpoint = Endpoint.parse(url)
        path = f"{self.endpoint.path.rstrip('/')}/v1/keys/{pool.key_id}/unwrap"
        self._prepare(path, [json.dumps({"wrapped_key": b64(c), "algorithm": pool.algorithm.value}).encode()
                             for c in pool.ciphertexts], pool)

    def check(self, index: int, body: bytes) -> bool:
        return bool(json.loads(body).get("key") == self.expected[index])


class BatchRequests(_FixedRequests):
    """`POST /v1/unwrap` with `{"items": [...]}` of `batch_size` items drawn in turn from the pool."""

    variants = 8

    def __init__(self, url: str, pool: Pool, batch_size: int) -> None:
        self.endpoint = Endpoint.parse(url)
        self.keys_per_request = batch_size
        path = f"{self.endpoint.path.rstrip('/')}/v1/unwrap"
        size = len(pool.ciphertexts)
        self.picks = [[(v * batch_size + i) % size for i in range(batch_size)] for v in range(self.variants)]
        self._prepare(path, [json.dumps({"items": [{"id": pool.key_id, "wrapped_key": b64(pool.ciphertexts[k]),
                                                    "algorithm": pool.algorithm.value} for k in picks]}).encode()
                             for picks in self.picks], pool)

    def check(self, index: int, body: bytes) -> bool:
        results = json.loads(body).get("results", [])
        return len(results) == len(self.picks[index]) and all(
            r.get("key") == self.expected[k] for r, k in zip(results, self.picks[index], strict=True))
