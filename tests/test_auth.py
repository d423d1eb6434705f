"""Who is calling and what they may do: allow-list matching on real certificates from lkm.pki."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import serialization

from lkm import pki
from lkm.auth import Actor, ActorKind, ClientPolicy, certificate_facts, platform_actor
from lkm.config import ClientRule
from lkm.errors import Forbidden
from lkm.roles import Role


@pytest.fixture(scope="module")
def ca() -> pki.Issued:
    return pki.make_ca("auth test CA")


@pytest.fixture(scope="module")
def alice(ca: pki.Issued) -> bytes:
    issued = pki.issue(ca, "alice", server=False, dns=("alice.example",), ips=("10.0.0.7",))
    return issued.cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def bob(ca: pki.Issued) -> bytes:
    return pki.issue(ca, "bob", server=False).cert.public_bytes(serialization.Encoding.DER)


def rule(name: str, *roles: Role, subject: str | None = None, san: str | None = None,
         fingerprint: str | None = None) -> ClientRule:
    return ClientRule(name=name, subject=subject, san=san, fingerprint=fingerprint, roles=frozenset(roles))


def test_certificate_facts(alice: bytes) -> None:
    facts = certificate_facts(alice)
    assert facts.subject_text == "CN=alice,O=lkm"
    assert facts.sans == {"alice.example", "10.0.0.7"}
    assert facts.fingerprint == hashlib.sha256(alice).hexdigest()


def test_subject_rule_matches_that_subject_only(alice: bytes, bob: bytes) -> None:
    policy = ClientPolicy((rule("ops", Role.READ, subject="CN=alice,O=lkm"),))
    actor = policy.identify(alice)
    assert actor is not None
    assert actor.kind is ActorKind.MTLS and actor.name == "ops" and actor.roles == {Role.READ}
    assert actor.subject == "CN=alice,O=lkm" and actor.fingerprint == hashlib.sha256(alice).hexdigest()
    assert policy.identify(bob) is None


def test_san_matches_without_regard_to_case(alice: bytes, bob: bytes) -> None:
    policy = ClientPolicy((rule("svc", Role.UNWRAP, san="ALICE.example"),))
    assert policy.identify(alice) is not None
    assert policy.identify(bob) is None


def test_fingerprint_rule(alice: bytes, bob: bytes) -> None:
    policy = ClientPolicy((rule("pinned", Role.ADMIN, fingerprint=hashlib.sha256(bob).hexdigest()),))
    assert policy.identify(alice) is None
    actor = policy.identify(bob)
    assert actor is not None and actor.roles == {Role.ADMIN}


def test_a_rule_needs_all_of_its_criteria(alice: bytes) -> None:
    policy = ClientPolicy((rule("both", Role.READ, subject="CN=alice,O=lkm", san="other.example"),))
    assert policy.identify(alice) is None


def test_several_matching_rules_give_the_union_of_roles(alice: bytes) -> None:
    policy = ClientPolicy((rule("readers", Role.READ, subject="CN=alice,O=lkm"),
                           rule("unwrappers", Role.UNWRAP, san="10.0.0.7"),
                           rule("admins", Role.ADMIN, subject="CN=bob,O=lkm")))
    actor = policy.identify(alice)
    assert actor is not None
    assert actor.name == "readers+unwrappers" and actor.roles == {Role.READ, Role.UNWRAP}


def test_the_cache_keeps_at_most_its_size(alice: bytes, bob: bytes) -> None:
    policy = ClientPolicy((rule("ops", Role.READ, subject="CN=alice,O=lkm"),), cache_size=1)
    first = policy.identify(alice)
    assert policy.identify(alice) is first  # cached by fingerprint
    assert policy.identify(bob) is None
    assert policy.identify(alice) is not first  # evicted by bob, matched again


def test_require_refuses_a_missing_role() -> None:
    actor = Actor(kind=ActorKind.MTLS, name="r", roles=frozenset({Role.READ}))
    actor.require(Role.READ)
    with pytest.raises(Forbidden) as info:
        actor.require(Role.UNWRAP)
    assert info.value.code == "forbidden_role" and "unwrap" in info.value.message


def test_the_platform_may_only_unwrap_and_is_audited_by_its_hawk_id() -> None:
    actor = platform_actor("genesys-1")
    assert actor.kind is ActorKind.HAWK and actor.roles == {Role.UNWRAP}
    assert actor.to_audit() == {"kind": "hawk", "name": "hawk:genesys-1", "hawk_id": "genesys-1"}


def test_actor_kinds_keep_their_wire_values() -> None:
    assert [kind.value for kind in ActorKind] == ["mtls", "hawk", "cli", "system"]
