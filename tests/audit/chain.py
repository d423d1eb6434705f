"""Helpers shared by the audit tests: sample events and the chain's byte form, computed independently."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from lkm.audit import (
    chain_files,
)


def event(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "request_id": f"req-{i}",
        "actor": {"kind": "mtls", "subject": "CN=platform", "fingerprint": "ab" * 32},
        "action": "decrypt",
        "key_id": f"kek-{i % 3}",
        "outcome": "allow",
        "latency_ms": 1.5,
        **extra,
    }


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def all_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for f in chain_files(path) for line in lines_of(f)]


def rehash(rec: dict[str, Any]) -> dict[str, Any]:
    rec = {k: v for k, v in rec.items() if k != "hash"}
    rec["hash"] = sha(canonical(rec))
    return rec
