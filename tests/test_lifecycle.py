"""The lifecycle rules on a real file key store, with the clock moved by argument instead of by waiting."""

from __future__ import annotations

import base64
import itertools
from datetime import timedelta
from pathlib import Path

import pytest

from lkm import lifecycle
from lkm.audit import AuditLog, utc_timestamp
from lkm.errors import Conflict, IllegalTransition, InvalidRequest, KeyUnusable
from lkm.keys import Algorithm, KeyRecord, KeyState, utcnow
from lkm.keystore.file import FileKeyStore
from tests.conftest import TEST_SCRYPT_N, VECTORS, vector_key

V0, V1 = "3f0c8c1e-6a55-4a4e-9a0e-2b8f2f1f6d11", "8d6c1f0a-2b3e-4c5d-8e9f-0a1b2c3d4e5f"


@pytest.fixture
def store(tmp_path: Path) -> FileKeyStore:
    return FileKeyStore(tmp_path / "keys", b"lifecycle test passphrase", scrypt_n=TEST_SCRYPT_N)


def add(store: FileKeyStore, index: int, state: KeyState) -> KeyRecord:
    """A key without paying for RSA key generation: the public test vectors."""
    return store.import_key((V0, V1)[index], vector_key(index), state=state)


def states(store: FileKeyStore) -> dict[str, KeyState]:
    return {k.id: k.state for k in store.list_keys()}


def unwrap_vector(store: FileKeyStore, index: int) -> bytes:
    vector = VECTORS["vectors"][index]
    algorithm = Algorithm.RSA_OAEP_SHA1 if vector["padding"].startswith("OAEP") or index == 0 else \
        Algorithm.RSA_PKCS1_V1_5
    return store.decrypt((V0, V1)[index], base64.b64decode(vector["ciphertext_b64"]), algorithm)


def test_every_transition_outside_the_table_is_refused_naming_both_states() -> None:
    for before, after in itertools.product(KeyState, KeyState):
        if after in lifecycle.TRANSITIONS[before]:
            lifecycle.check_transition(before, after)
            continue
        with pytest.raises(IllegalTransition, match=f"cannot go from {before.value} to {after.value}"):
            lifecycle.check_transition(before, after)
    assert lifecycle.TRANSITIONS[KeyState.DESTROYED] == frozenset()
    assert KeyState.DESTROYED in lifecycle.TRANSITIONS[KeyState.PENDING_DESTRUCTION]
    assert all(KeyState.DESTROYED not in lifecycle.TRANSITIONS[s] for s in KeyState
               if s is not KeyState.PENDING_DESTRUCTION)


@pytest.mark.slow
def test_a_created_key_is_active_only_when_nothing_is_and_no_registration_waits(store: FileKeyStore) -> None:
    assert lifecycle.create_key(store, registration=True).state is KeyState.PENDING_ACTIVATION
    first = lifecycle.create_key(store, registration=False)
    assert first.state is KeyState.ACTIVE
    second = lifecycle.create_key(store, registration=False)
    assert second.state is KeyState.PENDING_ACTIVATION
    assert [k.id for k in lifecycle.active_keys(store)] == [first.id]


@pytest.mark.slow
def test_rotation_without_registration_activates_at_once_and_old_keys_keep_unwrapping(store: FileKeyStore) -> None:
    add(store, 0, KeyState.ACTIVE)
    facts = lifecycle.ChangeFacts()
    new = lifecycle.rotate(store, registration=False, facts=facts)
    assert states(store) == {V0: KeyState.RETIRED, new.id: KeyState.ACTIVE}
    assert facts.previous_active == V0 and facts.retired == V0
    assert facts.audit_details()["previous_active"] == V0 and facts.audit_details()["to_state"] == "active"
    assert unwrap_vector(store, 0) == base64.b64decode(VECTORS["vectors"][0]["plaintext_b64"])


@pytest.mark.slow
def test_with_registration_the_previous_key_stays_active_until_the_platform_has_the_new_one(
        store: FileKeyStore) -> None:
    add(store, 0, KeyState.ACTIVE)
    new = lifecycle.rotate(store, registration=True)
    assert states(store) == {V0: KeyState.ACTIVE, new.id: KeyState.PENDING_ACTIVATION}
    # Two active keys (a crash between two writes, an operator's mistake): activation leaves one.
    add(store, 1, KeyState.ACTIVE)
    registered = lifecycle.mark_registered(store, new.id)
    assert registered.registered is not None
    assert states(store) == {V0: KeyState.RETIRED, V1: KeyState.RETIRED, new.id: KeyState.ACTIVE}
    with pytest.raises(IllegalTransition, match="cannot go from retired to active"):
        lifecycle.activate(store, V0)


def test_disable_and_enable(store: FileKeyStore) -> None:
    add(store, 0, KeyState.ACTIVE)
    add(store, 1, KeyState.PENDING_ACTIVATION)
    with pytest.raises(IllegalTransition, match="cannot go from active to disabled without force"):
        lifecycle.disable(store, V0)
    assert lifecycle.disable(store, V0, force=True).state is KeyState.DISABLED
    with pytest.raises(KeyUnusable):  # the store itself does not refuse; the service does, by state
        raise_if_unusable(store.get_key(V0))
    assert lifecycle.enable(store, V0).state is KeyState.ACTIVE  # nothing else became active meanwhile
    lifecycle.disable(store, V1)
    assert lifecycle.enable(store, V1).state is KeyState.PENDING_ACTIVATION
    lifecycle.disable(store, V0, force=True)
    lifecycle.activate(store, V1)
    assert lifecycle.enable(store, V0).state is KeyState.RETIRED  # V1 is active now: one active key per store
    with pytest.raises(IllegalTransition, match="cannot enable a retired key"):
        lifecycle.enable(store, V0)


def raise_if_unusable(record: KeyRecord) -> None:
    from lkm.service import UNWRAPPABLE_STATES, key_unusable

    if record.state not in UNWRAPPABLE_STATES:
        raise key_unusable(record)


def test_destruction_needs_every_safeguard_and_checks_the_clock_when_it_runs(store: FileKeyStore) -> None:
    add(store, 0, KeyState.RETIRED)
    t0 = utcnow().replace(microsecond=0)  # stored dates have whole seconds
    with pytest.raises(IllegalTransition, match="cannot go from retired to pending_destruction: disable the key"):
        lifecycle.schedule_destruction(store, V0, now=t0)
    with pytest.raises(IllegalTransition, match="cannot go from retired to destroyed"):
        lifecycle.destroy(store, V0, now=t0 + timedelta(days=365))
    lifecycle.disable(store, V0)
    with pytest.raises(InvalidRequest, match="7 to 3650 days"):
        lifecycle.schedule_destruction(store, V0, days=6, now=t0)
    scheduled = lifecycle.schedule_destruction(store, V0, days=7, now=t0)
    assert scheduled.state is KeyState.PENDING_DESTRUCTION and scheduled.destroy_after == t0 + timedelta(days=7)

    early = t0 + timedelta(days=6, hours=23)
    report = lifecycle.destruction_report(store, V0, audit_path=None, now=early)
    assert [s.ok for s in report.safeguards] == [True, True, True, False]
    with pytest.raises(IllegalTransition, match="waiting period passed: the waiting period ends"):
        lifecycle.destroy(store, V0, now=early)
    assert unwrap_vector(store, 0)  # still whole

    destroyed = lifecycle.destroy(store, V0, now=t0 + timedelta(days=7, seconds=1))
    assert destroyed.state is KeyState.DESTROYED
    with pytest.raises(KeyUnusable) as caught:
        unwrap_vector(store, 0)
    assert caught.value.code == "key_destroyed"
    assert store.get_key(V0).state is KeyState.DESTROYED  # the metadata stays, so unwraps say "destroyed"
    with pytest.raises(IllegalTransition, match="cannot enable a destroyed key"):
        lifecycle.enable(store, V0)


def test_cancelled_destruction_returns_the_key_to_disabled(store: FileKeyStore) -> None:
    add(store, 0, KeyState.DISABLED)
    lifecycle.schedule_destruction(store, V0)
    record = lifecycle.cancel_destruction(store, V0)
    assert record.state is KeyState.DISABLED and record.destroy_after is None
    with pytest.raises(IllegalTransition, match="destruction scheduled: no destruction scheduled"):
        lifecycle.destroy(store, V0, now=utcnow() + timedelta(days=400))
    with pytest.raises(IllegalTransition, match="cannot cancel destruction of a disabled key"):
        lifecycle.cancel_destruction(store, V0)


def test_a_shortened_waiting_period_in_the_metadata_is_refused(store: FileKeyStore) -> None:
    add(store, 0, KeyState.DISABLED)
    scheduled = lifecycle.schedule_destruction(store, V0, days=30)
    store.save_record(scheduled.with_changes(destroy_after=utcnow() + timedelta(days=1)))  # an edited file
    with pytest.raises(IllegalTransition, match="shorter than 7 days"):
        lifecycle.destroy(store, V0, now=utcnow() + timedelta(days=400))


def test_an_active_key_is_never_destroyed(store: FileKeyStore) -> None:
    add(store, 0, KeyState.ACTIVE)
    report = lifecycle.destruction_report(store, V0, audit_path=None, now=utcnow() + timedelta(days=400))
    assert not report.allowed and report.safeguards[0].name == "not active" and not report.safeguards[0].ok
    with pytest.raises(IllegalTransition, match="not active: state is active"):
        lifecycle.destroy(store, V0, now=utcnow() + timedelta(days=400))


def test_the_schedule_rotates_once_per_period(store: FileKeyStore) -> None:
    old = add(store, 0, KeyState.ACTIVE)
    assert lifecycle.rotate_if_due(store, 3600, registration=False) is None  # a fresh key: not due
    store.save_record(old.with_changes(created=utcnow() - timedelta(hours=2)))
    due = lifecycle.next_rotation_due(store.list_keys(), 3600)
    assert due is not None and due < utcnow()
    new = lifecycle.rotate_if_due(store, 3600, registration=False)
    assert new is not None and new.state is KeyState.ACTIVE
    assert lifecycle.rotate_if_due(store, 3600, registration=False) is None
    assert states(store) == {V0: KeyState.RETIRED, new.id: KeyState.ACTIVE}


def test_dry_run_finds_the_last_unwrap_in_the_audit_trail(store: FileKeyStore, tmp_path: Path) -> None:
    add(store, 0, KeyState.DISABLED)
    audit = AuditLog(tmp_path / "audit" / "audit.log")
    (tmp_path / "audit").mkdir()
    t0 = utcnow() - timedelta(days=3)
    for days, key_id, outcome in ((0, V1, "ok"), (1, V0, "ok"), (2, V0, "error"), (2, V1, "ok")):
        audit.record_sync({"action": "unwrap", "key_id": key_id, "outcome": outcome,
                           "time": utc_timestamp(t0 + timedelta(days=days))})
    report = lifecycle.destruction_report(store, V0, audit_path=audit.path)
    assert report.last_unwrap is not None
    assert abs(report.last_unwrap - (t0 + timedelta(days=1))) < timedelta(seconds=1)
    assert report.audit_since is not None and abs(report.audit_since - t0) < timedelta(seconds=1)
    never = lifecycle.destruction_report(store, V0, audit_path=tmp_path / "audit" / "missing.log")
    assert never.last_unwrap is None and never.last_unwrap_text().startswith("never")


def test_import_keeps_ids_and_refuses_a_second_active_key_or_other_material(store: FileKeyStore) -> None:
    record, created = lifecycle.import_key(store, V0, vector_key(0))
    assert created and record.state is KeyState.ACTIVE  # nothing was active
    again, created = lifecycle.import_key(store, V0, vector_key(0), state=KeyState.DISABLED)
    assert not created and again.state is KeyState.ACTIVE  # identical material: nothing changes
    with pytest.raises(Conflict, match="different key material"):
        lifecycle.import_key(store, V0, vector_key(1))
    with pytest.raises(IllegalTransition, match=f"key {V0} is active"):
        lifecycle.import_key(store, V1, vector_key(1), state=KeyState.ACTIVE)
    with pytest.raises(InvalidRequest, match="not destroyed"):
        lifecycle.import_key(store, V1, vector_key(1), state=KeyState.DESTROYED)
    assert lifecycle.import_key(store, V1, vector_key(1))[0].state is KeyState.RETIRED
