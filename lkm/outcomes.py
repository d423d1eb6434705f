"""How an unwrap ended, as the closed set of labels that metrics count by.

The service decides the outcome and metrics validate it, so the set lives here, below both: the service
stays free of prometheus and metrics free of the service. Audit records keep the precise error code instead.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from lkm.errors import (
    DecryptionFailed,
    Forbidden,
    InvalidRequest,
    KeyNotFound,
    KeyUnusable,
    Unavailable,
    UnsupportedAlgorithm,
)

__all__ = ["KEY_KNOWN_OUTCOMES", "UnwrapOutcome", "unwrap_outcome"]


class UnwrapOutcome(StrEnum):
    OK = "ok"
    DECRYPTION_FAILED = "decryption_failed"
    KEY_NOT_FOUND = "key_not_found"
    KEY_UNUSABLE = "key_unusable"
    UNSUPPORTED_ALGORITHM = "unsupported_algorithm"
    INVALID_REQUEST = "invalid_request"
    FORBIDDEN = "forbidden"
    UNAVAILABLE = "unavailable"
    ERROR = "error"


# Most specific first: DecryptionFailed and UnsupportedAlgorithm are InvalidRequests too.
_BY_ERROR: Final = (
    (DecryptionFailed, UnwrapOutcome.DECRYPTION_FAILED),
    (KeyNotFound, UnwrapOutcome.KEY_NOT_FOUND),
    (KeyUnusable, UnwrapOutcome.KEY_UNUSABLE),
    (UnsupportedAlgorithm, UnwrapOutcome.UNSUPPORTED_ALGORITHM),
    (InvalidRequest, UnwrapOutcome.INVALID_REQUEST),
    (Forbidden, UnwrapOutcome.FORBIDDEN),
    (Unavailable, UnwrapOutcome.UNAVAILABLE),
)

# Outcomes that prove the key exists, so its id is a bounded metric label.
KEY_KNOWN_OUTCOMES: Final = frozenset({UnwrapOutcome.OK, UnwrapOutcome.DECRYPTION_FAILED,
                                       UnwrapOutcome.KEY_UNUSABLE})


def unwrap_outcome(error: BaseException | None) -> UnwrapOutcome:
    """The outcome label of an unwrap that raised `error` (None: it succeeded)."""
    if error is None:
        return UnwrapOutcome.OK
    for kind, outcome in _BY_ERROR:
        if isinstance(error, kind):
            return outcome
    return UnwrapOutcome.ERROR
