"""The metadata object of a key on the token: a CKO_DATA whose CKA_VALUE is a JSON document.

Tokens may refuse to modify CKA_VALUE (SoftHSM2 does), so an update writes the next revision (`seq`) and
removes the older ones; readers take the highest. Documents are written in lkm's canonical JSON; any JSON
object with the right format is read, so metadata written by earlier versions stays readable.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from lkm.canonical import canonical_json
from lkm.keys import KeyRecord, load_public_pkcs1, record_from_doc, record_to_doc

BACKEND = "pkcs11"
META_APPLICATION = "lkm"
META_LABEL_PREFIX = "lkm-meta:"
META_FORMAT = "lkm-pkcs11-meta"
SECRET_LABEL = "lkm-secret:pkcs1-rejection"  # noqa: S105 - a label; the value is a private object on the token
SECRET_BYTES = 32


def parse_meta(value: bytes) -> dict[str, Any] | None:
    """The document, or None when the bytes are not lkm metadata (another application's object)."""
    try:
        doc = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != META_FORMAT:
        return None
    return doc


def encode_meta(doc: dict[str, Any]) -> bytes:
    return canonical_json(doc)


def revision(doc: dict[str, Any]) -> tuple[int, bytes]:
    """Highest `seq` wins; equal ones (two servers writing at once) are ordered by content, the same everywhere."""
    seq = doc.get("seq")
    return (seq if isinstance(seq, int) else 0, encode_meta(doc))


def public_numbers(doc: dict[str, Any]) -> rsa.RSAPublicNumbers:
    return load_public_pkcs1(base64.b64decode(doc["public_key"])).public_numbers()


def doc_from_record(record: KeyRecord) -> dict[str, Any]:
    return {"format": META_FORMAT, "version": 1, **record_to_doc(record)}


def record_from_meta(value: bytes) -> KeyRecord:
    doc = parse_meta(value)
    if doc is None:
        raise ValueError("not lkm key metadata")
    return record_from_doc(doc, backend=BACKEND)
