"""The one canonical JSON byte form: what is hashed, sealed or compared must serialize the same way twice."""

from __future__ import annotations

import json
from typing import Any

# One encoder for every call: json.dumps with these options builds a new JSONEncoder each time.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_text(obj: Any) -> str:
    """canonical_json before its UTF-8 encoding."""
    return _ENCODER.encode(obj)


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8, no NaN: equal documents give equal bytes."""
    return _ENCODER.encode(obj).encode("utf-8")
