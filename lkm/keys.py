"""Domain values: key ids, key states, paddings, key records and public-key encodings.

Nothing here does I/O or knows about HTTP; key stores and routes share these values.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from lkm.errors import IllegalTransition, InvalidRequest

KEY_BITS = 3072
PUBLIC_EXPONENT = 65537
CIPHERTEXT_BYTES = KEY_BITS // 8

_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def new_key_id() -> str:
    return str(uuid.uuid4())


def parse_key_id(value: object) -> str:
    """A key id is a UUID; ids are stored lowercase, callers may send either case."""
    if not isinstance(value, str):
        raise InvalidRequest("key id must be a UUID string", code="invalid_key_id")
    lowered = value.strip().lower()
    if not _UUID_RE.match(lowered):
        raise InvalidRequest("key id must be a UUID (8-4-4-4-12 hex digits)", code="invalid_key_id")
    return lowered


class KeyState(enum.StrEnum):
    """Where a key is in its life; TRANSITIONS below says which moves exist, lkm.lifecycle makes them."""

    PENDING_ACTIVATION = "pending_activation"  # new, serves unwraps, becomes active once the platform has it
    ACTIVE = "active"
    RETIRED = "retired"
    DISABLED = "disabled"
    PENDING_DESTRUCTION = "pending_destruction"
    DESTROYED = "destroyed"


S = KeyState
TRANSITIONS: dict[KeyState, frozenset[KeyState]] = {
    S.PENDING_ACTIVATION: frozenset({S.ACTIVE, S.DISABLED}),
    S.ACTIVE: frozenset({S.RETIRED, S.DISABLED}),
    S.RETIRED: frozenset({S.DISABLED}),
    # enable goes back to where the key was: retired, pending activation, or active if nothing else is.
    S.DISABLED: frozenset({S.RETIRED, S.PENDING_ACTIVATION, S.ACTIVE, S.PENDING_DESTRUCTION}),
    S.PENDING_DESTRUCTION: frozenset({S.DISABLED, S.DESTROYED}),
    S.DESTROYED: frozenset(),
}
"""The one place that says which state changes exist; the lifecycle and both stores' destruction obey it."""


def check_transition(before: KeyState, after: KeyState, why: str = "") -> None:
    """Raises IllegalTransition unless TRANSITIONS allows before -> after."""
    if after not in TRANSITIONS[before]:
        raise IllegalTransition(f"cannot go from {before.value} to {after.value}" + (f": {why}" if why else ""))


DESTRUCTION_RULE = "only a key pending destruction loses its private half"
"""Why a store refuses to destroy a key in any other state (its message names both states, then this)."""


class Algorithm(enum.StrEnum):
    """Closed set of RSA decryption paddings; the wire names of the native API."""

    RSA_OAEP_SHA1 = "RSA-OAEP-SHA1"
    RSA_OAEP_SHA256 = "RSA-OAEP-SHA256"
    RSA_PKCS1_V1_5 = "RSA-PKCS1-V1_5"

    @classmethod
    def parse(cls, value: object) -> Algorithm:
        if isinstance(value, str):
            for alg in cls:
                if alg.value == value:
                    return alg
        choices = ", ".join(a.value for a in cls)
        raise InvalidRequest(f"algorithm must be one of: {choices}", code="unsupported_algorithm")


PADDINGS: dict[Algorithm, padding.AsymmetricPadding] = {
    Algorithm.RSA_OAEP_SHA1: padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None),  # noqa: S303
    Algorithm.RSA_OAEP_SHA256: padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(),
                                            label=None),
    Algorithm.RSA_PKCS1_V1_5: padding.PKCS1v15(),
}
"""The software padding for each algorithm (file store; wrapping in tests, the canary and the benchmark)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def format_time(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


@dataclass(frozen=True)
class KeyRecord:
    """What lkm knows about a key, without its private half."""

    id: str
    state: KeyState
    created: datetime
    public_key_der: bytes  # DER PKCS#1 RSAPublicKey, the platform's format
    backend: str = "file"
    updated: datetime | None = None
    destroy_after: datetime | None = None
    registered: datetime | None = None
    label: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def with_changes(self, **changes: Any) -> KeyRecord:
        return replace(self, **changes)

    @property
    def public_key(self) -> rsa.RSAPublicKey:
        return load_public_pkcs1(self.public_key_der)

    def to_json(self) -> dict[str, Any]:
        return {**_record_fields(self), "backend": self.backend}


def _record_fields(record: KeyRecord) -> dict[str, Any]:
    """What the API shows and the stored form keeps alike: identity, state and timeline, label."""
    return {
        "id": record.id,
        "state": record.state.value,
        "created": format_time(record.created),
        "updated": format_time(record.updated) if record.updated else None,
        "destroy_after": format_time(record.destroy_after) if record.destroy_after else None,
        "registered": format_time(record.registered) if record.registered else None,
        "label": record.label,
    }


def record_to_doc(record: KeyRecord) -> dict[str, Any]:
    """The one stored form of a KeyRecord (key files, token metadata, backups); callers add their envelope."""
    return {**_record_fields(record), "extra": record.extra,
            "public_key": base64.b64encode(record.public_key_der).decode("ascii")}


def record_from_doc(doc: dict[str, Any], *, backend: str) -> KeyRecord:
    """Inverse of record_to_doc; raises KeyError/ValueError on a malformed document."""

    def time_or_none(name: str) -> datetime | None:
        value = doc.get(name)
        return parse_time(value) if value else None

    return KeyRecord(
        id=parse_key_id(doc["id"]),
        state=KeyState(doc["state"]),
        created=parse_time(doc["created"]),
        updated=time_or_none("updated"),
        destroy_after=time_or_none("destroy_after"),
        registered=time_or_none("registered"),
        label=str(doc.get("label") or ""),
        extra=dict(doc.get("extra") or {}),
        public_key_der=base64.b64decode(doc["public_key"], validate=True),
        backend=backend,
    )


# --- public-key encodings ---------------------------------------------------------------------------------

def public_der_pkcs1(key: rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)


def load_public_pkcs1(pkcs1_der: bytes) -> rsa.RSAPublicKey:
    key = serialization.load_der_public_key(pkcs1_der)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA public key")
    return key


def b64(data: bytes) -> str:
    """Standard base64 as text: how lkm writes binary into JSON (stored records, API answers)."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: object) -> bytes:
    """Strict standard base64 (a stray character is an error, not skipped); raises binascii.Error."""
    return base64.b64decode(str(text), validate=True)


def public_pkcs1_b64(pkcs1_der: bytes) -> str:
    """The platform's `publicKey`: one line of base64 over DER PKCS#1 RSAPublicKey."""
    return b64(pkcs1_der)


def public_spki_pem(pkcs1_der: bytes) -> str:
    return load_public_pkcs1(pkcs1_der).public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def _b64url_uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def public_jwk(key_id: str, pkcs1_der: bytes) -> dict[str, str]:
    numbers = load_public_pkcs1(pkcs1_der).public_numbers()
    return {"kty": "RSA", "kid": key_id, "use": "enc", "alg": "RSA-OAEP",
            "n": _b64url_uint(numbers.n), "e": _b64url_uint(numbers.e)}


def public_key_views(record: KeyRecord) -> dict[str, Any]:
    return {
        "public_key_pkcs1_b64": public_pkcs1_b64(record.public_key_der),
        "public_key_pem": public_spki_pem(record.public_key_der),
        "public_key_jwk": public_jwk(record.id, record.public_key_der),
    }


# --- private keys offered for import ----------------------------------------------------------------------

class ImportRejected(InvalidRequest):
    code = "import_rejected"


def load_private_key_any(data: bytes, password: bytes | None = None) -> rsa.RSAPrivateKey:
    """Accepts PEM (PKCS#1 or PKCS#8), DER, or one line of base64 DER PKCS#1 as the platform's sample stores it.

    The full RSA consistency check runs here, once, because an imported key is foreign.
    """
    text = data.strip()
    key: object
    try:
        if text.startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(text, password=password)
        else:
            der = data
            if _looks_like_base64(text):
                try:
                    der = base64.b64decode(b"".join(text.split()), validate=True)
                except (binascii.Error, ValueError):
                    der = data
            key = serialization.load_der_private_key(der, password=password)
    except TypeError:
        raise ImportRejected("the key is encrypted: pass --password-file FILE" if password is None
                             else "the key is not encrypted: drop --password-file") from None
    except ValueError:
        raise ImportRejected("not a readable private key: expected PEM (PKCS#1 or PKCS#8), DER, or base64 DER "
                             "PKCS#1" + (", or the password is wrong" if password is not None else "")) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ImportRejected("not an RSA private key")
    check_rsa_policy(key)
    return key


def _looks_like_base64(text: bytes) -> bool:
    return bool(re.fullmatch(rb"[A-Za-z0-9+/=\s]+", text))


def check_rsa_policy(key: rsa.RSAPrivateKey) -> None:
    numbers = key.public_key().public_numbers()
    if key.key_size != KEY_BITS:
        raise ImportRejected(f"key is RSA-{key.key_size}; lkm accepts RSA-{KEY_BITS} only")
    if numbers.e != PUBLIC_EXPONENT:
        raise ImportRejected(f"public exponent is {numbers.e}; lkm accepts {PUBLIC_EXPONENT} only")


def generate_private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=PUBLIC_EXPONENT, key_size=KEY_BITS)
