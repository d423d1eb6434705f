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
    ├── Unavailable              503  key store or audit trail not ready; carries Retry-After
    └── InternalError            500  our fault; details are logged, never sent

    ConfigError                  not an LkmError: a bad configuration stops start-up before anything serves
    KeyStoreError                a backend failure (I/O, token); the service turns it into Unavailable/Internal
    RegistrationError            one failed attempt to register a key with the platform; stable `code`
    CliError                     a command-line failure already phrased for the operator; exit status 1 or 2

Messages are public: they never hold key material, ciphertext or plaintext, and a DecryptionFailed message
never says why decryption failed.
"""

from __future__ import annotations


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
