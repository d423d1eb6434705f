"""Hawk request authentication (HMAC-SHA256), as the platform signs its calls.

The wire format follows the platform contract, section 3, to the byte. Beyond what the platform's own sample
checks, this adds what a production verifier needs: timestamp skew, nonce replay, payload hash, several live
credentials, and no timing oracle on credential ids or on which resource form was signed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lkm.errors import HawkError, HawkReason
from lkm.nonces import NonceCache, NonceStore

ALGORITHM = "sha256"

_ATTRIBUTES = frozenset({"id", "ts", "nonce", "hash", "ext", "mac", "app", "dlg"})
_REQUIRED = ("id", "ts", "nonce", "mac")
_MAY_BE_EMPTY = frozenset({"ext"})
_MAX_HEADER_CHARS = 4096
_WS = "[ \t\r\n]*"
_SCHEME_RE = re.compile(r"[ \t\r\n]*([A-Za-z0-9_]+)(?:[ \t\r\n]+(.*))?", re.DOTALL)
# Hawk's attribute value alphabet: printable ASCII without '"' and '\'.
_ATTR_RE = re.compile(_WS + r'([A-Za-z]+)' + _WS + '=' + _WS + r'"([\x20\x21\x23-\x5b\x5d-\x7e]*)"' + _WS)
_VALUE_RE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]+")
_TS_RE = re.compile(r"[0-9]{1,15}")
# The header as the platform (and sign_request) writes it: attributes in this order, ", " between them. One
# match parses it; any other spelling takes the general parser, which gives the same attributes for this form.
_V = r'([\x20\x21\x23-\x5b\x5d-\x7e]+)'
_CANONICAL_RE = re.compile(r'Hawk id="' + _V + '", ts="' + _V + '", nonce="' + _V + '"(?:, hash="' + _V
                           + r'")?(?:, ext="([\x20\x21\x23-\x5b\x5d-\x7e]*)")?, mac="' + _V + '"')
_HOST_CACHE_SIZE = 16  # Host header values a verifier remembers parsed (any caller may send any value)
_MAC_CACHE_SIZE = 32  # pre-keyed HMACs kept: a few live credentials, verifiers' dummy keys, a client's key
_HOST_RE = re.compile(r"[ \t]*(\[[0-9A-Za-z:.%]+\]|[^:\[\]\s/@\\]+)(?::([0-9]{1,5}))?[ \t]*")

@dataclass(frozen=True)
class HawkCredential:
    id: str
    key: str = field(repr=False)
    algorithm: str = ALGORITHM


# --- wire format --------------------------------------------------------------------------------------------

def parse_authorization(value: str) -> dict[str, str]:
    """Strict on content (Hawk's alphabet, known attributes, no duplicates), lenient on whitespace."""
    if not value or not value.strip():
        raise HawkError(HawkReason.MISSING)
    if len(value) > _MAX_HEADER_CHARS:
        raise HawkError(HawkReason.MALFORMED, "Header too long")
    canonical = _CANONICAL_RE.fullmatch(value)
    if canonical is None:
        return _parse_any_form(value)
    id_, ts, nonce, hash_, ext, mac = canonical.groups()
    attributes = {"id": id_, "ts": ts, "nonce": nonce, "mac": mac}
    if hash_ is not None:
        attributes["hash"] = hash_
    if ext is not None:
        attributes["ext"] = ext
    return attributes


def _parse_any_form(value: str) -> dict[str, str]:
    """parse_authorization for any order of attributes and any whitespace Hawk allows."""
    match = _SCHEME_RE.fullmatch(value)
    if match is None or match.group(1).lower() != "hawk" or not (match.group(2) or "").strip():
        raise HawkError(HawkReason.MALFORMED, "Bad header format")
    params: str = match.group(2)
    attributes: dict[str, str] = {}
    pos = 0
    while True:
        attr = _ATTR_RE.match(params, pos)
        if attr is None:
            raise HawkError(HawkReason.MALFORMED, "Bad header format")
        name, val = attr.group(1), attr.group(2)
        if name not in _ATTRIBUTES:
            raise HawkError(HawkReason.MALFORMED, "Unknown attribute")
        if name in attributes:
            raise HawkError(HawkReason.MALFORMED, f"Duplicate attribute: {name}")
        if not val and name not in _MAY_BE_EMPTY:
            raise HawkError(HawkReason.MALFORMED, f"Bad attribute value: {name}")
        attributes[name] = val
        pos = attr.end()
        if pos == len(params):
            break
        if params[pos] != ",":
            raise HawkError(HawkReason.MALFORMED, "Bad header format")
        pos += 1
    missing = [name for name in _REQUIRED if name not in attributes]
    if missing:
        raise HawkError(HawkReason.MALFORMED, f"Missing attributes: {', '.join(missing)}")
    return attributes


def _escape_ext(ext: str) -> str:
    return ext.replace("\\", "\\\\").replace("\n", "\\n")


def normalized_string(  # noqa: PLR0917 - positional, in the order the spec lists the fields
        ts: str | int, nonce: str, method: str, resource: str, host: str, port: int | str, hash_: str | None,
        ext: str | None, app: str | None = None, dlg: str | None = None) -> str:
    text = (f"hawk.1.header\n{ts}\n{nonce}\n{method.upper()}\n{resource}\n{host.lower()}\n{port}\n"
            f"{hash_ or ''}\n{_escape_ext(ext or '')}\n")
    if app:
        text += f"{app}\n{dlg or ''}\n"
    return text


_keyed_hmacs: dict[str, hmac.HMAC] = {}  # by key: an HMAC past its key schedule, copied for each MAC


def _keyed_mac(key: str, normalized: str) -> bytes:
    """Bytes, so the verifier compares them without a decode per request. From a copy of an HMAC already keyed:
    each MAC skips the key schedule (two SHA-256 blocks) and the digest lookup. Bounded: revoked keys and the
    dummy keys of discarded verifiers do not pile up."""
    keyed = _keyed_hmacs.get(key)
    if keyed is None:
        if len(_keyed_hmacs) >= _MAC_CACHE_SIZE:
            _keyed_hmacs.clear()
        keyed = _keyed_hmacs[key] = hmac.new(key.encode("utf-8"), digestmod=hashlib.sha256)
    mac = keyed.copy()
    mac.update(normalized.encode("utf-8"))
    return base64.b64encode(mac.digest())


def calculate_mac(key: str, normalized: str) -> str:
    return _keyed_mac(key, normalized).decode("ascii")


def timestamp_mac(key: str, ts: int) -> str:
    """The `tsm` of a stale-timestamp answer: lets the client trust our clock before adjusting to it."""
    return calculate_mac(key, f"hawk.1.ts\n{ts}\n")


def payload_hash(content_type: str | None, body: bytes) -> str:
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    digest = hashlib.sha256(b"hawk.1.payload\n" + mime.encode("utf-8") + b"\n" + body + b"\n").digest()
    return base64.b64encode(digest).decode("ascii")


def sign_request(credential: HawkCredential, *, method: str, resource: str, host: str, port: int,
                 content_type: str | None = None, body: bytes | None = None, ts: int | None = None,
                 nonce: str | None = None, ext: str | None = None, include_hash: bool = True) -> str:
    """The client side, for tests, the benchmark and a stand-in platform."""
    ts = int(time.time()) if ts is None else ts
    nonce = secrets.token_urlsafe(6) if nonce is None else nonce
    for name, value in (("id", credential.id), ("nonce", nonce), ("ext", ext)):
        if value and not _VALUE_RE.fullmatch(value):
            raise ValueError(f"{name} has characters a Hawk header cannot carry")
    hash_ = payload_hash(content_type, body) if body is not None and include_hash else None
    mac = calculate_mac(credential.key,
                        normalized_string(ts, nonce, method, resource, host, port, hash_, ext))
    parts = [f'id="{credential.id}"', f'ts="{ts}"', f'nonce="{nonce}"']
    if hash_:
        parts.append(f'hash="{hash_}"')
    if ext:
        parts.append(f'ext="{ext}"')
    parts.append(f'mac="{mac}"')
    return "Hawk " + ", ".join(parts)


# --- verification -------------------------------------------------------------------------------------------

def _split_host(value: str) -> tuple[str, int | None]:
    # Header bytes that are not UTF-8 reach us as surrogates; a host name is ASCII in any case.
    match = _HOST_RE.fullmatch(value) if value.isascii() else None
    if match is None:
        raise HawkError(HawkReason.MALFORMED, "Invalid Host header")
    port: int | None = None
    if match.group(2) is not None:
        port = int(match.group(2))
        if not 0 < port < 65536:
            raise HawkError(HawkReason.MALFORMED, "Invalid Host header")
    return match.group(1), port


@dataclass(frozen=True)
class Verified:
    """A request whose header (MAC, timestamp) checked out; its nonce and its payload hash are still to check."""

    credential: HawkCredential
    nonce_key: tuple[str, str, int]  # (credential id, nonce, ts): what a replay check remembers
    now: float
    claimed_hash: str | None  # the payload hash the MAC covered, checked once the body is read


class HawkVerifier:
    def __init__(self, lookup: Callable[[str], HawkCredential | None], skew_seconds: int, replay_check: bool,
                 nonce_cache_size: int, clock: Callable[[], float] = time.time, *,
                 nonce_cache: NonceStore | None = None) -> None:
        self.lookup = lookup
        self.skew_seconds = skew_seconds
        self.replay_check = replay_check
        self.clock = clock
        # Several server processes pass one shared store; alone, a process keeps its nonces in memory.
        self.nonce_cache: NonceStore = nonce_cache or NonceCache(nonce_cache_size, skew_seconds)
        self._dummy_key = secrets.token_urlsafe(32)
        # Every request of a caller names the same Host: its parse, by header value, with the settings it used.
        self._hosts: dict[str, tuple[tuple[str | None, int | None, int], tuple[str, int]]] = {}

    def verify(self, *, method: str, path: str, query: str, host_header: str | None, public_host: str | None,
               public_port: int | None, default_port: int, authorization: str | None,
               content_type: str | None, body: bytes) -> HawkCredential:
        """Header, replay check in this server's memory, then payload, for a body already read."""
        verified = self.verify_header(
            method=method, path=path, query=query, host_header=host_header, public_host=public_host,
            public_port=public_port, default_port=default_port, authorization=authorization)
        if not self.check_replay(verified):
            raise HawkError(HawkReason.REPLAY)
        self.verify_payload(verified.claimed_hash, content_type, body)
        return verified.credential

    def check_replay(self, verified: Verified) -> bool:
        """False for a nonce this server saw inside the window (always True with the replay check off)."""
        return not self.replay_check or self.nonce_cache.check_and_remember(*verified.nonce_key, verified.now)

    def verify_header(self, *, method: str, path: str, query: str, host_header: str | None,
                      public_host: str | None, public_port: int | None, default_port: int,
                      authorization: str | None) -> Verified:
        """The caller's credential and the payload hash it claims, from the header alone: no body needed.

        A server calls this before it reads a body, so an unknown id or a bad MAC never costs one; the replay
        check, whose place (memory or a shared database) the caller chooses, comes next. Pass `path` and
        `query` as sent on the wire (percent-encoding intact, query without '?').
        """
        if authorization is None:
            raise HawkError(HawkReason.MISSING)
        attrs = parse_authorization(authorization)
        ts_text = attrs["ts"]
        if not _TS_RE.fullmatch(ts_text):
            raise HawkError(HawkReason.MALFORMED, "Bad attribute value: ts")
        host, port = self._host_port(host_header, public_host, public_port, default_port)

        credential = self.lookup(attrs["id"])
        usable = credential is not None and credential.algorithm == ALGORITHM
        key = credential.key if credential is not None and usable else self._dummy_key
        resources = [path, f"{path}?{query}"] if query else [path]
        given = attrs["mac"].encode("ascii")
        matched = False
        for resource in resources:  # every candidate, always: no early exit tells which form was signed
            normalized = normalized_string(ts_text, attrs["nonce"], method, resource, host, port,
                                           attrs.get("hash"), attrs.get("ext"), attrs.get("app"),
                                           attrs.get("dlg"))
            matched |= hmac.compare_digest(_keyed_mac(key, normalized), given)
        if credential is None:
            raise HawkError(HawkReason.UNKNOWN_ID)
        if not usable:
            raise HawkError(HawkReason.UNSUPPORTED_ALGORITHM)
        if not matched:
            raise HawkError(HawkReason.BAD_MAC)

        now = self.clock()
        ts = int(ts_text)
        if abs(now - ts) > self.skew_seconds:
            now_s = int(now)
            raise HawkError(HawkReason.STALE_TIMESTAMP, www_authenticate=(
                f'Hawk ts="{now_s}", tsm="{timestamp_mac(credential.key, now_s)}", error="Stale timestamp"'))

        return Verified(credential, (credential.id, attrs["nonce"], ts), now, attrs.get("hash"))

    @staticmethod
    def verify_payload(claimed_hash: str | None, content_type: str | None, body: bytes) -> None:
        """The body against the hash the MAC covered; nothing to check when the client sent none."""
        if claimed_hash is not None:
            expected = payload_hash(content_type, body).encode("ascii")
            if not hmac.compare_digest(expected, claimed_hash.encode("ascii")):
                raise HawkError(HawkReason.BAD_HASH)

    def _host_port(self, host_header: str | None, public_host: str | None, public_port: int | None,
                   default_port: int) -> tuple[str, int]:
        if public_host is not None and public_port is not None:
            return public_host, public_port
        if host_header is None or not host_header.strip():
            raise HawkError(HawkReason.MALFORMED, "Missing Host header")
        known = self._hosts.get(host_header)
        if known is not None and known[0] == (public_host, public_port, default_port):
            return known[1]
        host, port = _split_host(host_header)
        found = (public_host if public_host is not None else host,
                 public_port if public_port is not None else (port if port is not None else default_port))
        if len(self._hosts) >= _HOST_CACHE_SIZE:
            self._hosts.clear()
        self._hosts[host_header] = ((public_host, public_port, default_port), found)
        return found
