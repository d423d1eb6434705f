"""The error tree: every error a caller can see has a status and a stable code, and the module's docstring draws
every class of the tree, so the drawing cannot drift from the code."""

from __future__ import annotations

import inspect
import re

import pytest

from lkm import errors
from lkm.errors import DecryptionFailed, LkmError, Unavailable

CLASSES = [cls for _, cls in inspect.getmembers(errors, inspect.isclass)
           if issubclass(cls, BaseException) and cls.__module__ == errors.__name__]
CALLER_ERRORS = [cls for cls in CLASSES if issubclass(cls, LkmError)]


def test_the_docstring_draws_every_class() -> None:
    drawn = set(re.findall(r"^\s*[│├└─ ]*([A-Z][A-Za-z]+)", errors.__doc__ or "", flags=re.MULTILINE))
    assert {cls.__name__ for cls in CLASSES} - drawn == set()


@pytest.mark.parametrize("cls", CALLER_ERRORS, ids=lambda cls: cls.__name__)
def test_caller_errors_carry_status_and_stable_code(cls: type[LkmError]) -> None:
    assert 400 <= cls.status <= 599
    assert re.fullmatch(r"[a-z][a-z0-9_]*", cls.code)
    assert cls.default_message


def test_codes_are_distinct_per_class() -> None:
    codes = [cls.code for cls in CALLER_ERRORS if cls is not errors.InternalError]
    assert len(codes) == len(set(codes))


def test_a_decryption_failure_says_nothing_about_its_cause() -> None:
    with pytest.raises(TypeError):
        DecryptionFailed("bad padding")  # type: ignore[call-arg]
    assert str(DecryptionFailed()) == "decryption failed"


def test_unavailable_tells_when_to_retry() -> None:
    assert Unavailable().retry_after == 5
    assert Unavailable(retry_after=30).status == 503
