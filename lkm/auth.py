"""Who is calling, and what they may do.

Callers of the native API are identified by their client certificate (already chain-verified by TLS against the
configured CA); the allow list in the config maps subjects, SANs or fingerprints to roles. The platform is
identified by its Hawk credential id and may only unwrap.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from cryptography import x509

from lkm.config import ClientRule
from lkm.errors import Forbidden
from lkm.roles import Role


class ActorKind(StrEnum):
    """How a caller proved who it is; also the `method` label of the auth-failure metric."""

    MTLS = "mtls"      # a client certificate on the native listener
    HAWK = "hawk"      # a Hawk credential on the platform listener
    CLI = "cli"        # an operator at the key store's host
    SYSTEM = "system"  # the server itself (scheduled rotation, registration)


@dataclass(frozen=True)
class Actor:
    kind: ActorKind
    name: str
    roles: frozenset[Role] = field(default_factory=frozenset)
    subject: str | None = None
    fingerprint: str | None = None
    hawk_id: str | None = None
    user: str | None = None

    def require(self, role: Role) -> None:
        if role not in self.roles:
            raise Forbidden(f"this identity lacks the {role.value} role", code="forbidden_role")

    def to_audit(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "name": self.name}
        for attr in ("subject", "fingerprint", "hawk_id", "user"):
            value = getattr(self, attr)
            if value is not None:
                data[attr] = value
        return data


def platform_actor(hawk_id: str) -> Actor:
    return Actor(kind=ActorKind.HAWK, name=f"hawk:{hawk_id}", roles=frozenset({Role.UNWRAP}), hawk_id=hawk_id)


@dataclass(frozen=True)
class CertificateFacts:
    subject: x509.Name
    subject_text: str
    fingerprint: str
    sans: frozenset[str]


def certificate_facts(der: bytes) -> CertificateFacts:
    cert = x509.load_der_x509_certificate(der)
    sans: set[str] = set()
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        ext = None
    if ext is not None:
        for general_name in ext:
            value = general_name.value
            if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
                sans.add(str(value))
            elif isinstance(value, str):
                sans.add(value)
    return CertificateFacts(subject=cert.subject, subject_text=cert.subject.rfc4514_string(),
                            fingerprint=hashlib.sha256(der).hexdigest(), sans=frozenset(sans))


class ClientPolicy:
    """Maps a verified client certificate to an Actor, or None for an identity nobody listed.

    A rule with several criteria (subject, san, fingerprint) needs all of them; a certificate matching several
    rules gets the union of their roles. Results are cached by certificate fingerprint.
    """

    def __init__(self, rules: tuple[ClientRule, ...], cache_size: int = 1024) -> None:
        self._rules = [(rule, _parse_subject(rule.subject)) for rule in rules]
        self._cache: OrderedDict[str, Actor | None] = OrderedDict()
        self._cache_size = cache_size

    def replace(self, rules: tuple[ClientRule, ...]) -> None:
        """A reload's allow-list: from the next request on, with nothing cached from the old one."""
        parsed = [(rule, _parse_subject(rule.subject)) for rule in rules]
        self._rules, self._cache = parsed, OrderedDict()

    def identify(self, der: bytes) -> Actor | None:
        fingerprint = hashlib.sha256(der).hexdigest()
        if fingerprint in self._cache:
            self._cache.move_to_end(fingerprint)
            return self._cache[fingerprint]
        actor = self._match(certificate_facts(der))
        self._cache[fingerprint] = actor
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return actor

    def _match(self, facts: CertificateFacts) -> Actor | None:
        names: list[str] = []
        roles: set[Role] = set()
        for rule, subject in self._rules:
            if subject is not None and subject != facts.subject:
                continue
            if rule.san is not None and rule.san.lower() not in {s.lower() for s in facts.sans}:
                continue
            if rule.fingerprint is not None and rule.fingerprint != facts.fingerprint:
                continue
            names.append(rule.name)
            roles |= rule.roles
        if not names:
            return None
        return Actor(kind=ActorKind.MTLS, name="+".join(names), roles=frozenset(roles), subject=facts.subject_text,
                     fingerprint=facts.fingerprint)


def _parse_subject(text: str | None) -> x509.Name | None:
    if text is None:
        return None
    return x509.Name.from_rfc4514_string(text)
