"""lkm.jsontext: an encoder built once gives exactly what json.dumps gives with the same options."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from lkm.jsontext import one_shot_encoder

DOCUMENTS: list[Any] = [
    {"b": 1, "a": [1, 2.5, None, True, False], "c": {"z": "é\u2028\x00\"\\", "y": -0.0, "x": 10**30}},
    ["plain", 1e-7, 1.7976931348623157e308, {"nested": [{"deep": {}}, []]}],
    "just a string",
    42,
    {"ключ": "значение", "emoji": "\U0001f511", "ctrl": "\t\n\r"},
]


@pytest.mark.parametrize("options", [
    {"sort_keys": True, "separators": (",", ":"), "ensure_ascii": False, "allow_nan": False},
    {"separators": (",", ":"), "default": str},
    {},
])
@pytest.mark.parametrize("document", DOCUMENTS)
def test_same_text_as_json_dumps(options: dict[str, Any], document: Any) -> None:
    assert one_shot_encoder(**options)(document) == json.dumps(document, **options)


def test_nan_is_refused_when_asked_and_written_otherwise() -> None:
    with pytest.raises(ValueError, match="Out of range float"):
        one_shot_encoder(allow_nan=False)({"x": math.nan})
    assert one_shot_encoder()({"x": math.inf}) == json.dumps({"x": math.inf})


def test_default_handles_what_json_cannot() -> None:
    class Opaque:
        def __str__(self) -> str:
            return "opaque"

    assert one_shot_encoder(default=str)({"o": Opaque()}) == '{"o": "opaque"}'
    with pytest.raises(TypeError):
        one_shot_encoder()({"o": Opaque()})


def test_a_cycle_fails_rather_than_looping() -> None:
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    with pytest.raises(RecursionError):
        one_shot_encoder()(cyclic)
