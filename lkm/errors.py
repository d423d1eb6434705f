"""The error vocabulary of lkm, in one place.

    LkmError                     every error a caller may see; carries status, stable code, public message
    ├── InvalidRequest           400  the caller sent something malformed (code says what)
    │   ├── UnsupportedAlgorithm 400  padding unknown, or not offered by this key store
    │   └── DecryptionFailed     400  one uniform answer for every failed private-key operation
    ├── Unauthenticated          401  no or bad credentials (Hawk)
    ├── Forbidden                403  known caller, missing role; or certificate not on the allow list
    ├── KeyNotFound              404  no key with this id
    ├── PayloadTooLarge          413
    ├── Conflict                 409  the request clashes with what exists (id taken, ...)
    │   ├── KeyUnusable          409  key disabled / destroyed / pending destruction
    │   └── IllegalTransition    409  a key-state change that the lifecycle forbids
    ├── RateLimited              429  the caller is over its rate limit (or slowed by the breaker); Retry-After
    ├── Unavailable              503  key store or audit trail not ready; carries Retry-After
    └── InternalError            500  our fault; details are logged, never sent

    ConfigError                  not an LkmError: a bad configuration stops start-up before anything serves
    KeyStoreError                a backend failure (I/O, token); the service turns it into Unavailable/Internal
    AuditWriteError              an audit record is not durable; a fail-closed server refuses to act unaudited
    HawkError                    a failed Hawk authentication; the platform route answers it with a 401
    MalformedHttp                a request the platform listener cannot parse; `status` is its answer (400, 411, 431)
    WorkerFailure                a PKCS#11 worker's answer other than success; the store maps its kind to an error

    Operator tools (text for a person at a terminal, never sent over the API):
    BackupError                  a backup bundle is unreadable, damaged, or the passphrase is wrong
    ExportUnreadable(ValueError) a key export file as a whole cannot be read; nothing was imported
    TargetError                  lkm bench: the target is incomplete or unreachable
    ProtocolError                lkm bench: the server's answer was not HTTP/1.1 as lkm writes it
    SpawnError                   lkm bench: a child server did not become ready
    FloorError(OSError)          lkm bench: the floor endpoint did not start
    RegistrationError            one failed attempt to register a key with the platform; stable `code`
    CliError                     a command-line failure already phrased for the operator; exit status 1 or 2

Messages are public: they never hold key material, ciphertext or plaintext, and a DecryptionFailed message
never says why decryption failed.
"""

from __future__ import annotations

from enum import StrEnum


class LkmError(Exception):
    status: int = 500
    code: str = "internal_error"
    default_message: str = "internal error"

    def __init__(self, message: str | None = None, *, code: str | None = None,
                 retry_after: int | None = None) -> None:
        self.message = message or self.default_message
        if code is not None:
            self.code = code
        self.retry_after = retry_after
        self.audited = False  # set once an audit record of this refusal exists, so it is written once
        super().__init__(self.message)


class InvalidRequest(LkmError):
    status = 400
    code = "invalid_request"
    default_message = "invalid request"


class UnsupportedAlgorithm(InvalidRequest):
    code = "unsupported_algorithm"
    default_message = "unsupported algorithm"


class DecryptionFailed(InvalidRequest):
    code = "decryption_failed"
    default_message = "decryption failed"

    def __init__(self) -> None:
        # Deliberately no argument: nothing about the cause may reach the caller.
        super().__init__()


class Unauthenticated(LkmError):
    status = 401
    code = "unauthenticated"
    default_message = "authentication required"


class Forbidden(LkmError):
    status = 403
    code = "forbidden"
    default_message = "forbidden"


class KeyNotFound(LkmError):
    status = 404
    code = "key_not_found"
    default_message = "no such key"


class PayloadTooLarge(LkmError):
    status = 413
    code = "payload_too_large"
    default_message = "request body too large"


class Conflict(LkmError):
    status = 409
    code = "conflict"
    default_message = "conflict"


class KeyUnusable(Conflict):
    code = "key_unusable"
    default_message = "key cannot be used"


class IllegalTransition(Conflict):
    code = "illegal_transition"
    default_message = "illegal key state transition"


class RateLimited(LkmError):
    status = 429
    code = "rate_limited"
    default_message = "too many requests"

    def __init__(self, message: str | None = None, *, retry_after: int = 1) -> None:
        super().__init__(message, retry_after=retry_after)


class Unavailable(LkmError):
    status = 503
    code = "unavailable"
    default_message = "service temporarily unavailable"

    def __init__(self, message: str | None = None, *, code: str | None = None,
                 retry_after: int | None = 5) -> None:
        super().__init__(message, code=code, retry_after=retry_after)


class InternalError(LkmError):
    pass


class ConfigError(Exception):
    """A configuration problem, phrased as: file, setting, what was expected."""

    def __init__(self, source: str, setting: str, expected: str) -> None:
        self.source = source
        self.setting = setting
        self.expected = expected
        super().__init__(f"{source}: {setting}: {expected}")


class KeyStoreError(Exception):
    """A backend failure (I/O error, token gone). Its text is for logs only, never for callers."""

    def __init__(self, message: str, *, transient: bool = True) -> None:
        self.transient = transient
        super().__init__(message)


# --- audit ---

class AuditWriteError(Exception):
    """The record is not durable. A fail-closed server must not act on the decision it describes."""


# --- web and auth ---

class HawkReason(StrEnum):
    """Why a Hawk authentication failed: the `reason` label of the auth-failure metric and the `hawk_*` codes."""

    MISSING = "missing"
    MALFORMED = "malformed"
    UNKNOWN_ID = "unknown_id"
    BAD_MAC = "bad_mac"
    BAD_HASH = "bad_hash"
    STALE_TIMESTAMP = "stale_timestamp"
    REPLAY = "replay"
    UNSUPPORTED_ALGORITHM = "unsupported_algorithm"


# Reasons a caller must not be able to tell apart (they would reveal which credential ids exist).
_HAWK_AUTH_FAILED = "Invalid credentials or mac"
_HAWK_MESSAGES: dict[HawkReason, str] = {
    HawkReason.MISSING: "Hawk authentication required",
    HawkReason.MALFORMED: "Bad Hawk authorization header",
    HawkReason.UNKNOWN_ID: _HAWK_AUTH_FAILED,
    HawkReason.BAD_MAC: _HAWK_AUTH_FAILED,
    HawkReason.UNSUPPORTED_ALGORITHM: _HAWK_AUTH_FAILED,
    HawkReason.BAD_HASH: "Bad payload hash",
    HawkReason.STALE_TIMESTAMP: "Stale timestamp",
    HawkReason.REPLAY: "Invalid nonce",
}


class HawkError(Exception):
    """A failed Hawk authentication. `reason` is for logs and metrics; the message is safe to send to callers.

    Not an LkmError: the platform route turns it into its own 401 (`Unauthenticated`, code `hawk_<reason>`)
    with the `WWW-Authenticate` challenge this carries.
    """

    def __init__(self, reason: HawkReason, message: str | None = None, *,
                 www_authenticate: str | None = None) -> None:
        self.reason = reason
        self.message = message or _HAWK_MESSAGES[reason]
        if www_authenticate is None:
            www_authenticate = "Hawk" if reason is HawkReason.MISSING else f'Hawk error="{self.message}"'
        self.www_authenticate: str | None = www_authenticate
        super().__init__(self.message)

# --- storage and bench ---

class MalformedHttp(Exception):
    """A request the platform listener could not parse; the message names the problem, never the bytes."""

    def __init__(self, status: int, problem: str) -> None:
        super().__init__(problem)
        self.status = status


class BackupError(Exception):
    """The bundle is unreadable, damaged, or the passphrase is wrong; the text is for the operator."""


class ExportUnreadable(ValueError):
    """The file as a whole cannot be read (not the sample's export); nothing was imported."""


class TargetError(Exception):
    """The target is incomplete or unreachable; the message says what to pass."""


class ProtocolError(Exception):
    """The server's answer was not HTTP/1.1 as lkm writes it, or the connection ended mid-answer."""


class SpawnError(Exception):
    """The child server did not become ready; the message holds the end of its log."""


class FloorError(OSError):
    """The floor endpoint did not start; the message holds the end of its error output."""

# --- platform registration ---

class RegistrationError(Exception):
    """One failed attempt. `code` is stable (audit, logs); the message is for operators."""

    def __init__(self, message: str, *, code: str, retryable: bool) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable


# --- command line ---

class CliError(Exception):
    """A failure already phrased for the operator; exit status 1 (2 for usage and config)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# --- the PKCS#11 worker protocol ---

class WorkerFailure(Exception):
    """A PKCS#11 worker's answer other than success, `kind` being one of the worker protocol's kinds.

    Raised inside a worker process, and raised again in the server process once the (kind, text) pair has
    crossed the pipe; the key store turns each kind into one lkm error at its edge.
    """

    def __init__(self, kind: StrEnum, text: str = "") -> None:
        self.kind = kind
        self.text = text
        super().__init__(kind.value, text)
