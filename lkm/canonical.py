"""The one canonical JSON byte form: what is hashed, sealed or compared must serialize the same way twice."""

from __future__ import annotations

from typing import Any

from lkm.jsontext import one_shot_encoder

_encode = one_shot_encoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_text(obj: Any) -> str:
    """canonical_json before its UTF-8 encoding."""
    return _encode(obj)


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8, no NaN: equal documents give equal bytes."""
    return _encode(obj).encode("utf-8")
