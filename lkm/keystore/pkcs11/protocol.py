"""What the server process and its token workers say to each other over a worker's pipe.

A request is (Op value, args); an answer is ("ok", value) or ("err", Fail value, text). Plain strings travel
on the pipe (cheap to pickle on every decrypt); both ends turn them back into these closed enums.
"""

from __future__ import annotations

import enum
import importlib.util
import uuid
from dataclasses import dataclass

INSTALL_HINT = "python-pkcs11 is not installed; install the HSM extra: pip install 'lkm[hsm]'"
KEY_LABEL_PREFIX = "lkm:"
PROBE_BITS = 2048
PKCS1_PLAINTEXT_BYTES = 32

SPAWN_TIMEOUT = 60.0
KEYGEN_TIMEOUT = 600.0
STOP_TIMEOUT = 2.0

OK = "ok"
ERR = "err"


class Op(enum.StrEnum):
    """A worker operation; the worker runs its method `op_<value>` (hello and stop are the pipe's own)."""

    HELLO = "hello"
    STOP = "stop"
    CHECK = "check"
    PROBE = "probe"
    LIST = "list"
    GET = "get"
    CREATE = "create"
    IMPORT = "import"
    SAVE = "save"
    DESTROY = "destroy"
    DECRYPT = "decrypt"
    DECRYPT_LOOP = "decrypt_loop"
    SECRET = "secret"  # noqa: S105 - not a secret: the name of the operation that reads the store's own


class Fail(enum.StrEnum):
    """Kinds of answer other than success; the store maps each to one lkm error."""

    NOT_FOUND = "not_found"
    DESTROYED = "destroyed"
    MISSING = "missing"  # metadata without its private key
    DECRYPT_FAILED = "decrypt_failed"
    REJECTED = "rejected"  # PKCS#1 v1.5 padding: answered by implicit rejection, never an error
    CONFLICT = "conflict"
    ILLEGAL = "illegal"  # a state change the lifecycle forbids, judged on the token
    IMPORT_REFUSED = "import_refused"
    ERROR = "error"  # KeyStoreError, transient
    TOKEN = "token"  # noqa: S105 - not a secret. Token or library failure: transient, and the workers are replaced
    FATAL = "fatal"  # KeyStoreError, not transient (wrong PIN, no module, ambiguous token)


@dataclass(frozen=True)
class TokenConfig:
    """What a worker needs to find its token; picklable, and without the PIN (sent once, over the pipe)."""

    module: str
    token_label: str | None
    token_serial: str | None
    env: tuple[tuple[str, str], ...] = ()  # what the module reads from the environment (SoftHSM2: SOFTHSM2_CONF)


def key_id_bytes(key_id: str) -> bytes:
    """The CKA_ID of a key's objects: the 16 raw bytes of its UUID."""
    return uuid.UUID(key_id).bytes


def pkcs11_available() -> bool:
    return importlib.util.find_spec("pkcs11") is not None
