"""JSON encoders built once and called many times.

Why: `json.JSONEncoder.encode` builds a new C encoder, and a closure for floats, on every call; that is about
two microseconds, paid by every audit record (sealed twice) and every log line. The C encoder made here is the
one `encode` would make, kept; it only skips the check for circular references, which the plain dicts and
lists encoded here cannot have (a cycle still fails, as a RecursionError).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from json import encoder as _encoder
from typing import Any

__all__ = ["one_shot_encoder"]


def one_shot_encoder(*, sort_keys: bool = False, ensure_ascii: bool = True, allow_nan: bool = True,
                     default: Callable[[Any], Any] | None = None,
                     separators: tuple[str, str] = (", ", ": ")) -> Callable[[Any], str]:
    """A function giving what `json.dumps` with these options gives, without building an encoder per call."""
    reference = json.JSONEncoder(sort_keys=sort_keys, ensure_ascii=ensure_ascii, allow_nan=allow_nan,
                                 default=default, separators=separators, check_circular=False)
    make = getattr(_encoder, "c_make_encoder", None)  # not in the stubs
    if make is None:  # an interpreter without the C accelerator
        return reference.encode
    item_separator, key_separator = separators
    strings = _encoder.encode_basestring_ascii if ensure_ascii else _encoder.encode_basestring
    chunks = make(None, reference.default, strings, None, key_separator, item_separator, sort_keys, False,
                  allow_nan)

    def encode(obj: Any, _chunks: Callable[[Any, int], Any] = chunks, _join: Callable[..., str] = "".join) -> str:
        return _join(_chunks(obj, 0))

    return encode
