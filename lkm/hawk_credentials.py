"""Where Hawk credentials live: the credentials file that `lkm hawk` writes, and the source the verifier looks
ids up in (the file, inline credentials from the config, and the key store's database when it is shared)."""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lkm.fsutil import atomic_write, ensure_private_dir, file_lock, remove_orphaned_temps
from lkm.hawk import ALGORITHM, HawkCredential

_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
CREDENTIALS_FILE_VERSION = 1


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
            self._compose()
            return True

    def _compose(self) -> None:
        """Under the lock: the live set from its three sources; the file and the configuration win a clash."""
        self._credentials = {**self._shared, **self._loaded, **self._extra}

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
            self._loaded = loaded
            self._compose()  # the database's credentials stay: a reload changes neither them nor their notice
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
            self._compose()
            self._signature = signature
            return True
