"""lkm.outcomes: every error maps to the one outcome label metrics accept for it."""

from __future__ import annotations

import pytest

from lkm.errors import (
    DecryptionFailed,
    Forbidden,
    InternalError,
    InvalidRequest,
    KeyNotFound,
    KeyStoreError,
    KeyUnusable,
    Unavailable,
    UnsupportedAlgorithm,
)
from lkm.metrics import UNWRAP_OUTCOMES, Metrics
from lkm.outcomes import KEY_KNOWN_OUTCOMES, UnwrapOutcome, unwrap_outcome


@pytest.mark.parametrize(("error", "label"), [
    (None, "ok"),
    (DecryptionFailed(), "decryption_failed"),
    (KeyNotFound(), "key_not_found"),
    (KeyUnusable(), "key_unusable"),
    (UnsupportedAlgorithm(), "unsupported_algorithm"),  # an InvalidRequest, but the more specific label wins
    (InvalidRequest(), "invalid_request"),
    (Forbidden(), "forbidden"),
    (Unavailable(), "unavailable"),
    (InternalError(), "error"),
    (KeyStoreError("disk gone"), "error"),
    (RuntimeError("bug"), "error"),
])
def test_each_error_has_its_label(error: BaseException | None, label: str) -> None:
    outcome = unwrap_outcome(error)
    assert outcome == label and isinstance(outcome, UnwrapOutcome)
    metrics = Metrics()
    metrics.observe_unwrap("native", outcome, 0.001)  # metrics accept every label the service can produce
    assert metrics.registry.get_sample_value(
        "lkm_unwraps_total", {"route": "native", "key_id": "none", "outcome": outcome}) == 1


def test_metrics_accept_exactly_the_outcomes() -> None:
    assert tuple(o.value for o in UnwrapOutcome) == UNWRAP_OUTCOMES
    assert {"ok", "decryption_failed", "key_unusable"} == KEY_KNOWN_OUTCOMES
