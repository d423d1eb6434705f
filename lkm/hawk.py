"""Hawk request authentication (HMAC-SHA256), as the platform signs its calls.

The wire format follows the platform contract, section 3, to the byte. Beyond what the platform's own sample
checks, this adds what a production verifier needs: timestamp skew, nonce replay, payload hash, several live
credentials, and no timing oracle on credential ids or on which resource form was signed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lkm.errors import HawkError, HawkReason
from lkm.fsutil import atomic_write, ensure_private_dir, file_lock, remove_orphaned_temps
from lkm.nonces import NonceStore

ALGORITHM = "sha256"
CREDENTIALS_FILE_VERSION = 1

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
_HOST_RE = re.compile(r"[ \t]*(\[[0-9A-Za-z:.%]+\]|[^:\[\]\s/@\\]+)(?::([0-9]{1,5}))?[ \t]*")
_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")

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


def calculate_mac(key: str, normalized: str) -> str:
    digest = hmac.new(key.encode("utf-8"), normalized.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


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

class NonceCache:
    """Remembers (id, nonce, ts) until ts leaves the skew window, after which the ts check rejects a replay.

    Insertion order approximates expiry order; an entry that expires early may wait behind an older one for
    up to one window, which costs memory, never correctness. When full, the oldest entry goes first (bounded
    memory wins over perfect replay detection under a flood).
    """

    def __init__(self, max_entries: int, window_seconds: int) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.window_seconds = window_seconds
        self.overflow_evictions = 0
        self._entries: OrderedDict[tuple[str, str, int], float] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def check_and_remember(self, cred_id: str, nonce: str, ts: int, now: float) -> bool:
        """False when this (id, nonce, ts) was already seen and is still inside the window."""
        key = (cred_id, nonce, ts)
        with self._lock:
            entries = self._entries
            while entries:
                oldest_key, oldest_expiry = next(iter(entries.items()))
                if oldest_expiry >= now:
                    break
                del entries[oldest_key]
            expiry = entries.get(key)
            if expiry is not None:
                if expiry >= now:
                    return False
                del entries[key]
            entries[key] = ts + self.window_seconds
            while len(entries) > self.max_entries:
                entries.popitem(last=False)
                self.overflow_evictions += 1
            return True


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
            matched |= hmac.compare_digest(calculate_mac(key, normalized).encode("ascii"), given)
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

    @staticmethod
    def _host_port(host_header: str | None, public_host: str | None, public_port: int | None,
                   default_port: int) -> tuple[str, int]:
        if public_host is not None and public_port is not None:
            return public_host, public_port
        if host_header is None or not host_header.strip():
            raise HawkError(HawkReason.MALFORMED, "Missing Host header")
        host, port = _split_host(host_header)
        return (public_host if public_host is not None else host,
                public_port if public_port is not None else (port if port is not None else default_port))


# --- credential storage -------------------------------------------------------------------------------------

def valid_credential_id(cred_id: str) -> bool:
    """The ids `lkm hawk` accepts, wherever the credential is kept (file or database)."""
    return _ID_RE.fullmatch(cred_id) is not None


def check_credential_id(cred_id: str) -> str:
    """The id itself, or ValueError with the wording every store uses."""
    if not valid_credential_id(cred_id):
        raise ValueError(f"Hawk credential id {cred_id!r}: expected 1-64 characters of A-Z a-z 0-9 . _ -")
    return cred_id


def _read_entries(path: Path) -> list[dict[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    try:
        data: Any = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("version") != CREDENTIALS_FILE_VERSION:
        raise ValueError(f"{path}: expected an object with \"version\": {CREDENTIALS_FILE_VERSION}")
    items = data.get("credentials")
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected \"credentials\" to be a list")
    entries: list[dict[str, str]] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        where = f"{path}: credentials[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected an object")
        cred_id, key = item.get("id"), item.get("key")
        algorithm, created = item.get("algorithm", ALGORITHM), item.get("created", "")
        if not isinstance(cred_id, str) or not valid_credential_id(cred_id):
            raise ValueError(f"{where}: id must be 1-64 characters of A-Z a-z 0-9 . _ -")
        if cred_id in seen:
            raise ValueError(f"{where}: duplicate id {cred_id!r}")
        if not isinstance(key, str) or not key:
            raise ValueError(f"{where}: key must be a non-empty string")
        if algorithm != ALGORITHM:
            raise ValueError(f"{where}: algorithm must be {ALGORITHM!r}")
        if not isinstance(created, str):
            raise ValueError(f"{where}: created must be an ISO 8601 string")
        seen.add(cred_id)
        entries.append({"id": cred_id, "key": key, "algorithm": algorithm, "created": created})
    return entries


def _write_entries(path: Path, entries: list[dict[str, str]]) -> None:
    document = {"version": CREDENTIALS_FILE_VERSION, "credentials": entries}
    atomic_write(path, (json.dumps(document, indent=2) + "\n").encode("utf-8"), mode=0o600)


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def load_credentials_file(path: Path) -> dict[str, HawkCredential]:
    return {e["id"]: HawkCredential(e["id"], e["key"], e["algorithm"]) for e in _read_entries(path)}


def mint_credential(path: Path, cred_id: str) -> HawkCredential:
    check_credential_id(cred_id)
    ensure_private_dir(path.parent)
    with file_lock(_lock_path(path)):
        remove_orphaned_temps(path.parent)  # a credential write killed before its rename
        entries = _read_entries(path)
        if any(e["id"] == cred_id for e in entries):
            raise ValueError(f"{path}: a Hawk credential with id {cred_id!r} already exists")
        credential = HawkCredential(cred_id, secrets.token_urlsafe(32))
        entries.append({"id": cred_id, "key": credential.key, "algorithm": ALGORITHM,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        _write_entries(path, entries)
    return credential


def revoke_credential(path: Path, cred_id: str) -> bool:
    if not path.exists():
        return False
    with file_lock(_lock_path(path)):
        remove_orphaned_temps(path.parent)
        entries = _read_entries(path)
        kept = [e for e in entries if e["id"] != cred_id]
        if len(kept) == len(entries):
            return False
        _write_entries(path, kept)
    return True


class CredentialSource:
    """The live credential set: a file `lkm hawk create` edits under us, plus credentials from the config.

    A reload that fails keeps the previous set, so a bad edit never locks the platform out.
    """

    def __init__(self, path: Path | None = None, extra: Mapping[str, HawkCredential] | None = None) -> None:
        self.path = path
        self._extra = dict(extra or {})
        self._signature: tuple[int, int, int] | None = None
        self._loaded: dict[str, HawkCredential] = {}  # from the file
        self._shared: dict[str, HawkCredential] = {}  # from the key store's database, when it keeps them
        self._credentials: dict[str, HawkCredential] = dict(self._extra)
        self._lock = threading.Lock()
        if path is not None:
            remove_orphaned_temps(path.parent)  # at start-up: writes killed before their rename
        self.reload_if_changed()

    def set_shared(self, credentials: Mapping[str, HawkCredential]) -> bool:
        """The credentials every replica reads from the database (`lkm hawk` writes there); True on a change.
        The file and the configuration win on a clash (they are this machine's explicit choice)."""
        with self._lock:
            if dict(credentials) == self._shared:
                return False
            self._shared = dict(credentials)
            self._credentials = {**self._shared, **self._loaded, **self._extra}
            return True

    def get(self, cred_id: str) -> HawkCredential | None:
        return self._credentials.get(cred_id)

    def replace_inline(self, extra: Mapping[str, HawkCredential]) -> None:
        """A reload's inline credentials, with the file read again; ValueError keeps the old set."""
        loaded = load_credentials_file(self.path) if self.path is not None else {}
        clash = sorted(set(loaded) & set(extra))
        if clash:
            raise ValueError(f"{self.path}: id {clash[0]!r} is also configured inline")
        with self._lock:
            self._extra = dict(extra)
            self._credentials = {**loaded, **self._extra}
            self._signature = None  # the next refresh reads the file again and records its signature

    def ids(self) -> list[str]:
        return sorted(self._credentials)

    def reload_if_changed(self) -> bool:
        """Cheap enough to call on every refresh tick: a stat, and a read only when the file changed.

        Raises ValueError for a malformed file (the old set stays live and the same file is not retried).
        """
        if self.path is None:
            return False
        with self._lock:
            try:
                st = os.stat(self.path)
                signature: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
            except FileNotFoundError:
                signature = None
            if signature == self._signature:
                return False
            try:
                loaded = load_credentials_file(self.path)
                clash = sorted(set(loaded) & set(self._extra))
                if clash:
                    raise ValueError(f"{self.path}: id {clash[0]!r} is also configured inline")
            except ValueError:
                self._signature = signature
                raise
            self._loaded = loaded
            self._credentials = {**self._shared, **loaded, **self._extra}
            self._signature = signature
            return True
