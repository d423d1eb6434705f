"""lkm.keys: the key-state machine and the destruction rule the stores share."""

from __future__ import annotations

import itertools

import pytest

from lkm.errors import IllegalTransition
from lkm.keys import DESTRUCTION_RULE, TRANSITIONS, KeyState, check_transition


@pytest.mark.parametrize(("before", "after"), list(itertools.product(KeyState, KeyState)))
def test_check_transition_follows_the_table(before: KeyState, after: KeyState) -> None:
    if after in TRANSITIONS[before]:
        check_transition(before, after)
    else:
        with pytest.raises(IllegalTransition, match=f"^cannot go from {before.value} to {after.value}$"):
            check_transition(before, after)


def test_only_a_key_pending_destruction_can_be_destroyed() -> None:
    sources = {before for before, afters in TRANSITIONS.items() if KeyState.DESTROYED in afters}
    assert sources == {KeyState.PENDING_DESTRUCTION}
    assert TRANSITIONS[KeyState.DESTROYED] == frozenset()


def test_refusal_names_both_states_and_the_reason() -> None:
    with pytest.raises(IllegalTransition) as caught:
        check_transition(KeyState.ACTIVE, KeyState.DESTROYED, DESTRUCTION_RULE)
    assert caught.value.message == ("cannot go from active to destroyed: only a key pending destruction loses "
                                    "its private half")
    assert caught.value.code == "illegal_transition"


def test_lifecycle_uses_the_same_table() -> None:
    from lkm import lifecycle

    assert lifecycle.TRANSITIONS is TRANSITIONS and lifecycle.check_transition is check_transition
