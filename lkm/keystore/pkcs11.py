"""Key store in a PKCS#11 token (an HSM; SoftHSM2 for trials and CI): private keys never leave the token.

Objects on the token, per key (the token is the one truth that several lkm servers sharing it see):
    private key  CKO_PRIVATE_KEY RSA-3072 e=65537, CKA_TOKEN/PRIVATE/SENSITIVE true, CKA_EXTRACTABLE false,
                 CKA_DECRYPT/UNWRAP true, CKA_SIGN/SIGN_RECOVER/DERIVE false; generated on the token, so
                 CKA_ALWAYS_SENSITIVE and CKA_NEVER_EXTRACTABLE hold
    public key   CKO_PUBLIC_KEY, CKA_ENCRYPT/WRAP true, CKA_VERIFY false
    metadata     CKO_DATA, CKA_APPLICATION "lkm", CKA_LABEL "lkm-meta:<id>", token + private, CKA_VALUE = JSON
                 (state, dates, label, extra, the public key, and a revision `seq`)
Both keys carry CKA_ID = the 16 raw bytes of the key's UUID and CKA_LABEL "lkm:<id>" (readable in pkcs11-tool).
A key exists for lkm when its metadata object does; key objects without one (a crash mid-creation) are ignored
and cleaned up when that id is imported. Tokens may refuse to modify CKA_VALUE (SoftHSM2 does), so a metadata
update creates the next revision, then destroys the older ones; readers take the highest `seq`.

Process model, safe by construction: python-pkcs11 calls C_Initialize without CKF_OS_LOCKING_OK, so a token
library such as SoftHSM2 runs without locks and two threads with sessions crash the process. The server process
therefore never loads the PKCS#11 library (nor imports python-pkcs11): every token call runs in one of
`pool_size` worker processes (multiprocessing "spawn", never fork), each with its own library instance, logged
in once, holding one session and a cache of key handles. A caller thread checks a worker out of an idle queue,
sends one request over that worker's pipe, waits for the answer and checks the worker back in; so one session
is only ever used by one thread, and a crash in the library kills a worker, not the server. (As with any
"spawn" start method, a script that opens this store at top level needs the `if __name__ == "__main__":` guard.)

Recovery: a token failure (device error, session closed or invalid, token gone, library not initialized, ...)
or a dead or stuck worker answers KeyStoreError(transient=True) and retires every worker of that generation;
the next call (a request or `check()`) spawns fresh workers, which load the library again, find the token again
by label or serial (never by slot number) and log in again. Attempts are throttled to one per `retry_interval`
(1 s). A refused PIN is never retried (a real HSM would lock the user): it is a permanent error.

Mechanisms: RSA-OAEP-SHA1 (the platform's default) is CKM_RSA_PKCS_OAEP with SHA-1/MGF1-SHA1, RSA-OAEP-SHA256
the same with SHA-256, RSA-PKCS1-V1_5 is CKM_RSA_PKCS. At start-up a probe generates a session-only RSA-2048
keypair (CKA_TOKEN false), encrypts with `cryptography` and decrypts on the token: `supported_algorithms()`
reports what worked. SoftHSM2 2.6 rejects OAEP with SHA-256 (CKR_ARGUMENTS_BAD), so there this store does
not offer RSA-OAEP-SHA256 and `decrypt` raises UnsupportedAlgorithm("this key store does not support ...").

PKCS#1 v1.5 decision: a token reports bad PKCS#1 v1.5 padding as an error (SoftHSM2: CKR_GENERAL_ERROR), a
Bleichenbacher oracle if it reached the caller. So RSA-PKCS1-V1_5 is refused unless `allow_pkcs1` is set
(config `keystore.allow_pkcs1`). When it is set, this store emulates implicit rejection: whenever the token
rejects the padding, or the message is not 32 bytes long (every platform data key is AES-256), the answer is
HMAC-SHA256(secret, key id + ciphertext), 32 bytes, with a secret drawn at random when the store starts. A
caller sees the same status and the same shape of body for valid and invalid padding. Every other failed
decryption (OAEP) is DecryptionFailed.

Import decision: plaintext import of an RSA private key (customers migrating from the platform's sample, test
vectors) is supported unless `allow_import` is false (config `keystore.allow_import`; then Conflict with code
`import_unsupported`). An imported key is stored sensitive and non-extractable like a generated one, but its
CKA_ALWAYS_SENSITIVE and CKA_NEVER_EXTRACTABLE are false (it existed outside the token), and its metadata
says `extra.imported = true`.

Errors of the token library never reach callers: they become KeyNotFound, KeyUnusable, DecryptionFailed,
UnsupportedAlgorithm, Conflict, or KeyStoreError whose text (for logs) names the PKCS#11 error class only.
The PIN and key material appear in no exception text and no log line.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import importlib
import importlib.util
import json
import logging
import multiprocessing
import os
import queue
import secrets
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric import rsa

from lkm.errors import (
    Conflict,
    DecryptionFailed,
    IllegalTransition,
    KeyNotFound,
    KeyStoreError,
    KeyUnusable,
    LkmError,
    UnsupportedAlgorithm,
)
from lkm.keys import (
    KEY_BITS,
    PADDINGS,
    PUBLIC_EXPONENT,
    Algorithm,
    KeyRecord,
    KeyState,
    b64,
    check_rsa_policy,
    format_time,
    load_public_pkcs1,
    new_key_id,
    parse_key_id,
    public_der_pkcs1,
    record_from_doc,
    record_to_doc,
    utcnow,
)

if TYPE_CHECKING:
    from multiprocessing.context import SpawnContext, SpawnProcess

    from lkm.config import KeyStoreSettings

log = logging.getLogger(__name__)

INSTALL_HINT = "python-pkcs11 is not installed; install the HSM extra: pip install 'lkm[hsm]'"
META_APPLICATION = "lkm"
META_LABEL_PREFIX = "lkm-meta:"
KEY_LABEL_PREFIX = "lkm:"
META_FORMAT = "lkm-pkcs11-meta"
PROBE_BITS = 2048
PKCS1_PLAINTEXT_BYTES = 32

_SPAWN_TIMEOUT = 60.0
_KEYGEN_TIMEOUT = 600.0
_STOP_TIMEOUT = 2.0

def key_id_bytes(key_id: str) -> bytes:
    """The CKA_ID of a key's objects: the 16 raw bytes of its UUID."""
    return uuid.UUID(key_id).bytes


def pkcs11_available() -> bool:
    return importlib.util.find_spec("pkcs11") is not None


# --- worker side: runs in the spawned processes, the only place that imports python-pkcs11 -----------------------

@dataclass(frozen=True)
class _TokenConfig:
    """What a worker needs to find its token; picklable, and without the PIN (sent once, over the pipe)."""

    module: str
    token_label: str | None
    token_serial: str | None
    env: tuple[tuple[str, str], ...] = ()  # what the module reads from the environment (SoftHSM2: SOFTHSM2_CONF)


class _Fail(Exception):
    """An answer other than success, sent back to the server process as (kind, text).

    kinds: not_found, destroyed, missing (metadata without private key), decrypt_failed, rejected (PKCS#1
    v1.5 padding), conflict, import_refused, error (KeyStoreError, transient), token (token or library failure:
    transient, and the workers are replaced), fatal (KeyStoreError, not transient).
    """

    def __init__(self, kind: str, text: str = "") -> None:
        self.kind = kind
        self.text = text
        super().__init__(kind, text)


class _TokenWorker:
    """One process's library instance, its logged-in session and its cache of private-key handles."""

    def __init__(self, config: _TokenConfig, pin: str) -> None:
        self.config = config
        try:
            self.p11: Any = importlib.import_module("pkcs11")
        except ImportError:
            raise _Fail("fatal", INSTALL_HINT) from None
        self.exc: Any = self.p11.exceptions
        self.A: Any = self.p11.Attribute
        try:
            self.lib: Any = self.p11.lib(config.module)
        except self.exc.PKCS11Error as exc:
            if type(exc) is self.exc.PKCS11Error and "loading" in str(exc):
                raise _Fail("fatal", f"cannot load the PKCS#11 module {config.module}") from None
            raise
        self.token: Any = self._find_token()
        try:
            self.session: Any = self.token.open(rw=True, user_pin=pin)
        except (self.exc.PinIncorrect, self.exc.PinInvalid, self.exc.PinLenRange, self.exc.PinLocked,
                self.exc.PinExpired, self.exc.UserPinNotInitialized) as exc:
            raise _Fail("fatal", f"the token refused the user PIN ({type(exc).__name__}); check keystore.pin"
                        ) from None
        self.handles: dict[str, Any] = {}

    # --- plumbing --------------------------------------------------------------------------------------------

    def _find_token(self) -> Any:
        serial = self.config.token_serial.encode() if self.config.token_serial else None
        try:
            return self.lib.get_token(token_label=self.config.token_label, token_serial=serial)
        except self.exc.NoSuchToken:
            raise _Fail("token", f"no token {self._token_name()} (yet)") from None
        except self.exc.MultipleTokensReturned:
            raise _Fail("fatal", f"several tokens match {self._token_name()}; set token_serial") from None

    def _token_name(self) -> str:
        parts = []
        if self.config.token_label is not None:
            parts.append(f"label {self.config.token_label!r}")
        if self.config.token_serial is not None:
            parts.append(f"serial {self.config.token_serial!r}")
        return " and ".join(parts)

    def assert_token(self) -> None:
        """Raises a token failure unless the token answers C_GetTokenInfo as the one we opened."""
        try:
            info = self.token.slot.get_token()
        except self.exc.PKCS11Error as exc:
            raise _Fail("token", f"token {self._token_name()} does not answer ({type(exc).__name__})") from None
        if info.label != self.token.label or info.serial != self.token.serial:
            raise _Fail("token", f"the slot no longer holds token {self._token_name()}")

    def _request_errors(self) -> tuple[type[BaseException], ...]:
        """Errors about one request (a template, a mechanism): the token itself is fine."""
        e = self.exc
        return (e.AttributeTypeInvalid, e.AttributeValueInvalid, e.AttributeReadOnly, e.AttributeSensitive,
                e.TemplateIncomplete, e.TemplateInconsistent, e.MechanismInvalid, e.MechanismParamInvalid,
                e.KeySizeRange, e.KeyTypeInconsistent, e.FunctionNotSupported, e.FunctionRejected,
                e.DomainParamsInvalid, e.ArgumentsBad, e.DeviceMemory, e.TokenWriteProtected)

    def classify(self, exc: BaseException, op: str) -> _Fail:
        if isinstance(exc, _Fail):
            return exc
        if isinstance(exc, self._request_errors()):
            return _Fail("error", f"the token refused {op} (PKCS#11 {type(exc).__name__})")
        if isinstance(exc, self.exc.PKCS11Error):
            detail = str(exc)[:120] if type(exc) is self.exc.PKCS11Error else ""
            return _Fail("token", f"PKCS#11 {type(exc).__name__}{': ' + detail if detail else ''} during {op}")
        return _Fail("error", f"{type(exc).__name__} during {op}")

    def describe(self) -> dict[str, Any]:
        return {"label": self.token.label, "serial": self.token.serial.decode(errors="replace"),
                "model": self.token.model, "manufacturer": self.token.manufacturer_id,
                "library": self.lib.library_description, "library_version": list(self.lib.library_version),
                "pid": os.getpid()}

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the process exits next; nothing to report to
            self.session.close()

    # --- metadata objects ------------------------------------------------------------------------------------

    def _meta_objects(self, key_id: str) -> list[tuple[Any, dict[str, Any]]]:
        A = self.A
        found = []
        for obj in self.session.get_objects({A.CLASS: self.p11.ObjectClass.DATA,
                                             A.APPLICATION: META_APPLICATION,
                                             A.LABEL: META_LABEL_PREFIX + key_id}):
            doc = _parse_meta(obj[A.VALUE])
            if doc is not None and doc.get("id") == key_id:
                found.append((obj, doc))
        return found

    def read_meta(self, key_id: str) -> dict[str, Any] | None:
        found = self._meta_objects(key_id)
        if not found:
            self.assert_token()  # an empty answer from a token that went away is not "no such key"
            return None
        return max(found, key=lambda item: _revision(item[1]))[1]

    def write_meta(self, key_id: str, doc: dict[str, Any]) -> bytes:
        """Stores the next revision of a key's metadata, then removes the older ones."""
        A = self.A
        old = self._meta_objects(key_id)
        doc = dict(doc, seq=max((int(d.get("seq", 0)) for _, d in old), default=0) + 1)
        value = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        self.session.create_object({A.CLASS: self.p11.ObjectClass.DATA, A.TOKEN: True, A.PRIVATE: True,
                                    A.APPLICATION: META_APPLICATION, A.LABEL: META_LABEL_PREFIX + key_id,
                                    A.VALUE: value})
        for obj, _ in old:
            with contextlib.suppress(self.exc.ObjectHandleInvalid):  # another server removed it first
                obj.destroy()
        return value

    # --- key objects -----------------------------------------------------------------------------------------

    def _key_objects(self, key_id: str, object_class: Any) -> list[Any]:
        A = self.A
        return list(self.session.get_objects({A.CLASS: object_class, A.KEY_TYPE: self.p11.KeyType.RSA,
                                              A.ID: key_id_bytes(key_id)}))

    def _private_key(self, key_id: str) -> Any:
        key = self.handles.get(key_id)
        if key is not None:
            return key
        candidates = self._key_objects(key_id, self.p11.ObjectClass.PRIVATE_KEY)
        doc = self.read_meta(key_id)
        if doc is None:
            raise _Fail("not_found")
        if doc.get("state") == KeyState.DESTROYED.value:
            raise _Fail("destroyed")
        modulus = _public_numbers(doc).n
        for candidate in candidates:
            # The private key that matches the registered public key, not merely one with the same CKA_ID.
            if int.from_bytes(candidate[self.A.MODULUS], "big") == modulus:
                self.handles[key_id] = candidate
                return candidate
        self.assert_token()
        raise _Fail("missing", f"key {key_id}: the token holds its metadata but not its private key")

    def _mechanism(self, algorithm: Algorithm) -> tuple[Any, Any]:
        M, MGF = self.p11.Mechanism, self.p11.MGF
        if algorithm is Algorithm.RSA_OAEP_SHA1:
            return M.RSA_PKCS_OAEP, (M.SHA_1, MGF.SHA1, None)
        if algorithm is Algorithm.RSA_OAEP_SHA256:
            return M.RSA_PKCS_OAEP, (M.SHA256, MGF.SHA256, None)
        return M.RSA_PKCS, None

    def _crypto_errors(self) -> tuple[type[BaseException], ...]:
        e = self.exc
        return (e.GeneralError, e.EncryptedDataInvalid, e.EncryptedDataLenRange, e.DataInvalid,
                e.DataLenRange, e.FunctionFailed, e.ArgumentsBad, e.MechanismParamInvalid)

    def _public_key_template(self, key_id: str) -> dict[Any, Any]:
        A = self.A
        return {A.TOKEN: True, A.PRIVATE: False, A.ENCRYPT: True, A.WRAP: True, A.VERIFY: False,
                A.VERIFY_RECOVER: False, A.ID: key_id_bytes(key_id), A.LABEL: KEY_LABEL_PREFIX + key_id}

    def _private_key_template(self, key_id: str) -> dict[Any, Any]:
        A = self.A
        return {A.TOKEN: True, A.PRIVATE: True, A.SENSITIVE: True, A.EXTRACTABLE: False, A.DECRYPT: True,
                A.UNWRAP: True, A.SIGN: False, A.SIGN_RECOVER: False, A.DERIVE: False,
                A.ID: key_id_bytes(key_id), A.LABEL: KEY_LABEL_PREFIX + key_id}

    def _destroy_quietly(self, objects: list[Any]) -> None:
        for obj in objects:
            with contextlib.suppress(self.exc.PKCS11Error):
                obj.destroy()

    def _remove_orphans(self, key_id: str) -> None:
        """Key objects with this CKA_ID but no metadata: leftovers of a creation that did not finish."""
        ObjectClass = self.p11.ObjectClass
        self._destroy_quietly(self._key_objects(key_id, ObjectClass.PRIVATE_KEY)
                              + self._key_objects(key_id, ObjectClass.PUBLIC_KEY))
        self.handles.pop(key_id, None)

    # --- operations (called by name from the server process) -------------------------------------------------

    def op_check(self) -> None:
        self.assert_token()

    def op_probe(self) -> list[str]:
        A = self.A
        public_template = {A.TOKEN: False, A.PRIVATE: False, A.ENCRYPT: True, A.WRAP: True, A.VERIFY: False}
        private_template = {A.TOKEN: False, A.PRIVATE: True, A.SENSITIVE: True, A.EXTRACTABLE: False,
                            A.DECRYPT: True, A.UNWRAP: True, A.SIGN: False, A.DERIVE: False}
        pub, priv = self.session.generate_keypair(self.p11.KeyType.RSA, PROBE_BITS, label="lkm-probe",
                                                  store=False, public_template=public_template,
                                                  private_template=private_template)
        try:
            public_key = rsa.RSAPublicNumbers(int.from_bytes(pub[A.PUBLIC_EXPONENT], "big"),
                                              int.from_bytes(pub[A.MODULUS], "big")).public_key()
            supported = []
            for algorithm in Algorithm:
                message = secrets.token_bytes(PKCS1_PLAINTEXT_BYTES)
                ciphertext = public_key.encrypt(message, PADDINGS[algorithm])
                mechanism, param = self._mechanism(algorithm)
                try:
                    ok = priv.decrypt(ciphertext, mechanism=mechanism, mechanism_param=param) == message
                except (*self._crypto_errors(), self.exc.MechanismInvalid, self.exc.FunctionNotSupported):
                    ok = False
                if ok:
                    supported.append(algorithm.value)
            return supported
        finally:
            self._destroy_quietly([priv, pub])

    def op_list(self) -> list[bytes]:
        """The newest metadata revision of every key on the token."""
        A = self.A
        self.assert_token()
        best: dict[str, tuple[tuple[int, bytes], bytes]] = {}
        for obj in self.session.get_objects({A.CLASS: self.p11.ObjectClass.DATA,
                                             A.APPLICATION: META_APPLICATION}):
            value = obj[A.VALUE]
            doc = _parse_meta(value)
            if doc is None or not isinstance(doc.get("id"), str):
                continue
            if obj[A.LABEL] != META_LABEL_PREFIX + doc["id"]:
                continue
            rank = _revision(doc)
            if doc["id"] not in best or rank > best[doc["id"]][0]:
                best[doc["id"]] = (rank, value)
        self.assert_token()  # an empty listing from a vanished token must not look like "no keys"
        return [value for _, value in best.values()]

    def op_get(self, key_id: str) -> bytes | None:
        doc = self.read_meta(key_id)
        return None if doc is None else _encode_meta(doc)

    def op_create(self, key_id: str, doc: dict[str, Any]) -> bytes:
        A = self.A
        if self._meta_objects(key_id):
            raise _Fail("conflict", f"key {key_id} exists already")
        self._remove_orphans(key_id)
        pub, priv = self.session.generate_keypair(
            self.p11.KeyType.RSA, KEY_BITS, id=key_id_bytes(key_id), label=KEY_LABEL_PREFIX + key_id,
            store=True, public_template=self._public_key_template(key_id),
            private_template=self._private_key_template(key_id))
        try:
            numbers = rsa.RSAPublicNumbers(int.from_bytes(pub[A.PUBLIC_EXPONENT], "big"),
                                           int.from_bytes(pub[A.MODULUS], "big"))
            if numbers.e != PUBLIC_EXPONENT or numbers.n.bit_length() != KEY_BITS:
                raise _Fail("error", f"the token generated RSA-{numbers.n.bit_length()} e={numbers.e}")
            public_der = public_der_pkcs1(numbers.public_key())
            value = self.write_meta(key_id, dict(doc, public_key=b64(public_der)))
        except BaseException:
            self._destroy_quietly([priv, pub])
            raise
        self.handles[key_id] = priv
        return value

    def op_import(self, key_id: str, numbers: dict[str, int], doc: dict[str, Any]) -> tuple[bytes, bool]:
        """(stored metadata, whether it was created now); Conflict when the id holds other key material."""
        A = self.A
        existing = self.read_meta(key_id)
        if existing is not None:
            if existing.get("public_key") != doc["public_key"]:
                raise _Fail("conflict", f"key {key_id} already exists with different key material")
            return _encode_meta(existing), False
        self._remove_orphans(key_id)

        def big(name: str) -> bytes:
            value = numbers[name]
            return value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")

        common = {A.KEY_TYPE: self.p11.KeyType.RSA, A.MODULUS: big("n"), A.PUBLIC_EXPONENT: big("e")}
        created: list[Any] = []
        try:
            created.append(self.session.create_object({
                A.CLASS: self.p11.ObjectClass.PRIVATE_KEY, **common, **self._private_key_template(key_id),
                A.PRIVATE_EXPONENT: big("d"), A.PRIME_1: big("p"), A.PRIME_2: big("q"),
                A.EXPONENT_1: big("dmp1"), A.EXPONENT_2: big("dmq1"), A.COEFFICIENT: big("iqmp")}))
            created.append(self.session.create_object({
                A.CLASS: self.p11.ObjectClass.PUBLIC_KEY, **common, **self._public_key_template(key_id)}))
            value = self.write_meta(key_id, doc)
        except self._request_errors() as exc:
            self._destroy_quietly(created)
            raise _Fail("import_refused", f"the token refused the imported key (PKCS#11 {type(exc).__name__})"
                        ) from None
        except BaseException:
            self._destroy_quietly(created)
            raise
        self.handles[key_id] = created[0]
        return value, True

    def op_save(self, key_id: str, doc: dict[str, Any]) -> bytes:
        current = self.read_meta(key_id)
        if current is None:
            raise _Fail("not_found")
        if current.get("public_key") != doc.get("public_key"):
            raise _Fail("error", f"key {key_id}: refusing to change the public key of a stored key")
        return self.write_meta(key_id, doc)

    def op_destroy(self, key_id: str, updated: str) -> bytes:
        """Marks the key destroyed first (so no server uses it any more), then destroys its private half."""
        current = self.read_meta(key_id)
        if current is None:
            raise _Fail("not_found")
        if current.get("state") != KeyState.PENDING_DESTRUCTION.value:
            # Checked on the token itself: another server may have enabled the key since we last looked.
            raise _Fail("illegal", f"cannot go from {current.get('state')} to destroyed: only a key pending "
                                    "destruction loses its private half")
        value = self.write_meta(key_id, dict(current, state=KeyState.DESTROYED.value, updated=updated))
        self.handles.pop(key_id, None)
        for obj in self._key_objects(key_id, self.p11.ObjectClass.PRIVATE_KEY):
            obj.destroy()
        return value

    def op_decrypt_loop(self, key_id: str, ciphertexts: list[bytes], algorithm_name: str, seconds: float) -> int:
        """For `lkm bench --raw`: python-pkcs11 decrypts in this session for `seconds`, with no pipe in between.

        Only a count leaves the worker. This is the token's own rate through python-pkcs11, the ceiling the
        store (one pipe round trip per operation) and the server are measured against.
        """
        algorithm = Algorithm(algorithm_name)
        mechanism, param = self._mechanism(algorithm)
        key = self._private_key(key_id)
        count = 0
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            key.decrypt(ciphertexts[count % len(ciphertexts)], mechanism=mechanism, mechanism_param=param)
            count += 1
        return count

    def op_decrypt(self, key_id: str, ciphertext: bytes, algorithm_name: str) -> bytes:
        algorithm = Algorithm(algorithm_name)
        mechanism, param = self._mechanism(algorithm)
        cka_id = key_id_bytes(key_id)
        for _ in range(2):
            key = self._private_key(key_id)
            try:
                if key[self.A.ID] != cka_id:  # a token may reuse the handle of a destroyed object
                    self.handles.pop(key_id, None)
                    continue
                return bytes(key.decrypt(ciphertext, mechanism=mechanism, mechanism_param=param))
            except (self.exc.ObjectHandleInvalid, self.exc.KeyHandleInvalid):
                self.handles.pop(key_id, None)  # destroyed by another server, or the token went away: look again
            except self._crypto_errors():
                if algorithm is Algorithm.RSA_PKCS1_V1_5:
                    # No extra token call here: valid and invalid padding must cost the same.
                    raise _Fail("rejected") from None
                self.assert_token()  # a token in trouble may answer CKR_GENERAL_ERROR too
                raise _Fail("decrypt_failed") from None
        self.assert_token()
        raise _Fail("missing", f"key {key_id}: its private key handle keeps going stale")


def _worker_main(conn: Connection, config: _TokenConfig) -> None:
    """Entry point of a worker process: answers requests on `conn` until told to stop or the server is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the server, which stops its workers itself
    os.environ.update(dict(config.env))  # set before the module loads; the server's own environment is untouched
    worker: _TokenWorker | None = None
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            break
        if op == "stop":
            break
        try:
            if op == "hello":
                if worker is None:
                    worker = _TokenWorker(config, args[0])
                reply: tuple[Any, ...] = ("ok", worker.describe())
            elif worker is None:
                reply = ("err", "error", "worker not initialized")
            else:
                reply = ("ok", getattr(worker, "op_" + op)(*args))
        except Exception as exc:
            failure = worker.classify(exc, op) if worker is not None else _classify_early(exc, op)
            reply = ("err", failure.kind, failure.text)
        try:
            conn.send(reply)
        except (OSError, ValueError):
            break
    if worker is not None:
        worker.close()
    conn.close()


def _classify_early(exc: BaseException, op: str) -> _Fail:
    """An error while the library was being loaded or the token found: the token (or its directory) is away."""
    if isinstance(exc, _Fail):
        return exc
    name = type(exc).__name__
    if type(exc).__module__.startswith("pkcs11"):
        return _Fail("token", f"PKCS#11 {name} while opening the token ({op})")
    return _Fail("error", f"{name} while opening the token ({op})")


# --- shared helpers ---------------------------------------------------------------------------------------------

def _parse_meta(value: bytes) -> dict[str, Any] | None:
    try:
        doc = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("format") != META_FORMAT:
        return None
    return doc


def _encode_meta(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _revision(doc: dict[str, Any]) -> tuple[int, bytes]:
    """Highest `seq` wins; equal ones (two servers writing at once) are ordered by content, the same everywhere."""
    seq = doc.get("seq")
    return (seq if isinstance(seq, int) else 0, _encode_meta(doc))


def _public_numbers(doc: dict[str, Any]) -> rsa.RSAPublicNumbers:
    return load_public_pkcs1(base64.b64decode(doc["public_key"])).public_numbers()


def _doc_from_record(record: KeyRecord) -> dict[str, Any]:
    return {"format": META_FORMAT, "version": 1, **record_to_doc(record)}


def _record_from_meta(value: bytes) -> KeyRecord:
    doc = _parse_meta(value)
    if doc is None:
        raise ValueError("not lkm key metadata")
    return record_from_doc(doc, backend=Pkcs11KeyStore.backend)


# --- server side: the pool of worker processes ------------------------------------------------------------------

class _Remote(Exception):
    """A worker's answer other than success, for the key store to translate."""

    def __init__(self, kind: str, text: str) -> None:
        self.kind = kind
        self.text = text
        super().__init__(kind, text)


class _Slot:
    """One worker position in the pool; its process is replaced when it fails."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: SpawnProcess | None = None
        self.conn: Connection | None = None
        self.epoch = -1


class _WorkerPool:
    def __init__(self, config: _TokenConfig, pin: Callable[[], bytes], size: int, *,
                 retry_interval: float, op_timeout: float) -> None:
        self._config = config
        self._pin = pin
        self._ctx: SpawnContext = multiprocessing.get_context("spawn")
        self._slots = [_Slot(i) for i in range(size)]
        self._idle: queue.Queue[_Slot] = queue.Queue()
        for slot in self._slots:
            self._idle.put(slot)
        self._lock = threading.Lock()
        self._epoch = 0
        self._last_failure = float("-inf")
        self._retry_interval = retry_interval
        self.op_timeout = op_timeout
        self.fatal: str | None = None
        self.healthy = False
        self.token_info: dict[str, Any] = {}
        self._closed = False

    # --- life cycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Spawns every worker at once; raises KeyStoreError (transient when the token is merely away)."""
        slots = [self._idle.get() for _ in self._slots]
        try:
            self._last_failure = float("-inf")
            pin = self._read_pin()
            for slot in slots:
                self._launch(slot)
            for slot in slots:
                self._greet(slot, pin)
        except KeyStoreError:
            for slot in slots:
                self._stop(slot, graceful=False)
            self._failed_attempt()
            raise
        finally:
            for slot in slots:
                self._idle.put(slot)

    def close(self) -> None:
        """Stops the workers, after letting calls in flight finish (a few seconds at most)."""
        self._closed = True
        deadline = time.monotonic() + 5.0
        idle: list[_Slot] = []
        while len(idle) < len(self._slots):
            try:
                idle.append(self._idle.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        for slot in self._slots:
            self._stop(slot, graceful=slot in idle)
        for slot in idle:
            self._idle.put(slot)  # callers still waiting get a slot, then "closed"

    def worker_pids(self) -> list[int]:
        pids = []
        for slot in list(self._slots):
            process = slot.process
            with contextlib.suppress(ValueError):  # closed by another thread meanwhile
                if process is not None and process.pid is not None and process.is_alive():
                    pids.append(process.pid)
        return pids

    def _read_pin(self) -> str:
        try:
            pin = self._pin()
        except Exception as exc:  # ConfigError names the file and the setting, never the secret
            raise KeyStoreError(f"cannot read the token PIN: {exc}", transient=False) from None
        try:
            return pin.decode("utf-8")
        except UnicodeDecodeError:
            raise KeyStoreError("the token PIN is not UTF-8 text", transient=False) from None

    def _launch(self, slot: _Slot) -> None:
        self._stop(slot, graceful=False)
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_worker_main, args=(child_conn, self._config),
                                    name=f"lkm-hsm-worker-{slot.index}", daemon=True)
        try:
            process.start()
        except OSError as exc:
            parent_conn.close()
            raise KeyStoreError(f"cannot start an HSM worker process: {exc.strerror}") from None
        finally:
            child_conn.close()
        slot.process, slot.conn, slot.epoch = process, parent_conn, self._epoch

    def _greet(self, slot: _Slot, pin: str) -> None:
        try:
            self.token_info = self._roundtrip(slot, "hello", (pin,), _SPAWN_TIMEOUT)
        except _Remote as remote:
            self._stop(slot, graceful=False)
            raise KeyStoreError(f"HSM not available: {remote.text}") from None
        with self._lock:
            recovered = not self.healthy and self._last_failure > float("-inf")
            self.healthy = True
        if recovered:
            log.warning("HSM available again: token %r answers", self.token_info.get("label"))

    def _stop(self, slot: _Slot, *, graceful: bool) -> None:
        process, conn = slot.process, slot.conn
        slot.process, slot.conn = None, None
        if conn is not None:
            if graceful:
                with contextlib.suppress(OSError, ValueError):
                    conn.send(("stop", ()))
            conn.close()
        if process is not None:
            process.join(_STOP_TIMEOUT if graceful else 0)
            if process.is_alive():
                process.kill()
                process.join(_STOP_TIMEOUT)
            try:
                process.close()
            except ValueError:
                log.warning("HSM worker process %s would not exit", process.pid)

    def _failed_attempt(self) -> None:
        with self._lock:
            self._last_failure = time.monotonic()
            self.healthy = False

    # --- calls -----------------------------------------------------------------------------------------------

    def call(self, op: str, *args: Any, timeout: float | None = None) -> Any:
        """Runs `op` on an idle worker, (re)spawning it first when needed. Raises _Remote or KeyStoreError."""
        if self._closed:
            raise KeyStoreError("the PKCS#11 key store is closed", transient=False)
        wait = self.op_timeout if timeout is None else timeout
        try:
            slot = self._idle.get(timeout=wait)
        except queue.Empty:
            raise KeyStoreError(f"no HSM worker became free within {wait:.0f} s") from None
        try:
            self._ensure(slot)
            return self._roundtrip(slot, op, args, wait)
        finally:
            self._idle.put(slot)

    def _ensure(self, slot: _Slot) -> None:
        if self._closed:
            raise KeyStoreError("the PKCS#11 key store is closed", transient=False)
        if self.fatal is not None:
            raise KeyStoreError(self.fatal, transient=False)
        if slot.process is not None and slot.epoch == self._epoch and slot.process.is_alive():
            return
        with self._lock:
            wait = self._last_failure + self._retry_interval - time.monotonic()
            if wait > 0:
                raise KeyStoreError(f"HSM not available; next attempt in {wait:.1f} s")
            epoch = self._epoch
        try:
            pin = self._read_pin()
            self._launch(slot)
            slot.epoch = epoch
            self._greet(slot, pin)
        except KeyStoreError:
            self._failed_attempt()
            raise
        log.info("HSM worker %d (pid %s) logged in to token %r", slot.index,
                 self.token_info.get("pid"), self.token_info.get("label"))

    def _roundtrip(self, slot: _Slot, op: str, args: tuple[Any, ...], timeout: float) -> Any:
        conn = slot.conn
        if conn is None:
            raise KeyStoreError("HSM worker is not running")
        try:
            conn.send((op, args))
            if not conn.poll(timeout):
                self._stop(slot, graceful=False)
                self._token_failed(slot, f"HSM worker {slot.index} did not answer {op} within {timeout:.0f} s")
            reply = conn.recv()
        except (EOFError, OSError, ValueError):
            code = slot.process.exitcode if slot.process is not None else None
            self._stop(slot, graceful=False)
            self._failed_attempt()
            raise KeyStoreError(f"HSM worker {slot.index} died during {op} (exit code {code})") from None
        if reply[0] == "ok":
            return reply[1]
        kind, text = reply[1], reply[2]
        if kind == "token":
            self._stop(slot, graceful=False)
            self._token_failed(slot, text)
        if kind == "fatal":
            # A wrong PIN, an unloadable module, an ambiguous token: retrying would not help (and a real HSM
            # locks a user after a few wrong PINs), so the store stays down until the configuration is fixed.
            self._stop(slot, graceful=False)
            with self._lock:
                self.fatal = text
                self.healthy = False
            raise KeyStoreError(text, transient=False)
        raise _Remote(kind, text)

    def _token_failed(self, slot: _Slot, text: str) -> None:
        """Retires every worker of this generation: their library instances may all be stale."""
        with self._lock:
            if slot.epoch == self._epoch:
                self._epoch += 1
                if self.healthy:
                    log.warning("HSM failure, re-initializing the token workers: %s", text)
            self.healthy = False
            self._last_failure = time.monotonic()
        raise KeyStoreError(text)


# --- the key store ----------------------------------------------------------------------------------------------

class Pkcs11KeyStore:
    backend = "pkcs11"

    def __init__(self, module: str | os.PathLike[str], *, pin: bytes | Callable[[], bytes],
                 token_label: str | None = None, token_serial: str | None = None, pool_size: int = 2,
                 allow_pkcs1: bool = False, allow_import: bool = True, retry_interval: float = 1.0,
                 op_timeout: float = 30.0, module_env: tuple[tuple[str, str], ...] = ()) -> None:
        if not pkcs11_available():
            raise KeyStoreError(INSTALL_HINT, transient=False)
        if token_label is None and token_serial is None:
            raise KeyStoreError("the PKCS#11 key store needs token_label or token_serial", transient=False)
        if not Path(module).is_file():
            raise KeyStoreError(f"PKCS#11 module {module} does not exist", transient=False)
        if pool_size < 1:
            raise KeyStoreError("pool_size must be at least 1", transient=False)
        self.allow_pkcs1 = allow_pkcs1
        self.allow_import = allow_import
        self._records: dict[str, KeyRecord] = {}
        self._written: set[str] = set()  # ids this store wrote since the last refresh began
        self._refresh_lock = threading.Lock()  # _written belongs to one refresh at a time
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._rejection_secret = secrets.token_bytes(32)
        self._probed: frozenset[Algorithm] | None = None
        self._next_probe = 0.0
        self._retry_interval = retry_interval
        if callable(pin):
            pin_source = pin
        else:
            fixed_pin = bytes(pin)

            def pin_source() -> bytes:
                return fixed_pin

        config = _TokenConfig(os.fspath(module), token_label, token_serial, tuple(module_env))
        self._pool = _WorkerPool(config, pin_source, pool_size, retry_interval=retry_interval,
                                 op_timeout=op_timeout)
        try:
            self._pool.start()
        except KeyStoreError as exc:
            if not exc.transient:
                self._pool.close()
                raise
            log.warning("HSM not available at start-up (lkm is not ready; it retries): %s", exc)
            return
        try:
            self._probe()
            self.refresh()
        except KeyStoreError as exc:
            if not exc.transient:
                self._pool.close()
                raise
            log.warning("HSM failed during start-up (lkm is not ready; it retries): %s", exc)

    @classmethod
    def from_settings(cls, settings: KeyStoreSettings) -> Pkcs11KeyStore:
        if settings.module is None or settings.pin is None:
            raise KeyStoreError("keystore.type pkcs11 needs module and pin", transient=False)
        return cls(settings.module, pin=settings.pin.read_bytes, token_label=settings.token_label,
                   token_serial=settings.token_serial, pool_size=settings.pool_size,
                   allow_pkcs1=settings.pkcs11_allow_pkcs1,
                   allow_import=settings.pkcs11_allow_import, module_env=settings.module_env)

    # --- capabilities ----------------------------------------------------------------------------------------

    def _probe(self) -> frozenset[Algorithm]:
        try:
            names = self._pool.call("probe", timeout=_KEYGEN_TIMEOUT)
        except _Remote as remote:
            log.warning("cannot probe the token's mechanisms (%s); assuming RSA-OAEP-SHA1 and RSA-PKCS1-V1_5",
                        remote.text)
            names = [Algorithm.RSA_OAEP_SHA1.value, Algorithm.RSA_PKCS1_V1_5.value]
        probed = frozenset(Algorithm(name) for name in names)
        self._probed = probed
        missing = sorted(a.value for a in Algorithm if a not in probed)
        info = self._pool.token_info
        log.info("PKCS#11 token %r (%s %s, %s): decrypts %s%s", info.get("label"), info.get("manufacturer"),
                 info.get("model"), info.get("library"), ", ".join(sorted(a.value for a in probed)) or "nothing",
                 f"; the token lacks {', '.join(missing)}" if missing else "")
        if Algorithm.RSA_PKCS1_V1_5 in probed and not self.allow_pkcs1:
            log.info("RSA-PKCS1-V1_5 is refused on this key store (keystore.allow_pkcs1 is false)")
        return probed

    def _capabilities(self) -> frozenset[Algorithm]:
        probed = self._probed
        if probed is None and time.monotonic() >= self._next_probe:
            self._next_probe = time.monotonic() + self._retry_interval
            try:
                probed = self._probe()
            except KeyStoreError:
                probed = None
        if probed is None:
            # Not probed yet (token away since start-up): what every token does; decrypts fail as unavailable.
            return frozenset({Algorithm.RSA_OAEP_SHA1, Algorithm.RSA_PKCS1_V1_5})
        return probed

    def supported_algorithms(self) -> frozenset[Algorithm]:
        algorithms = self._capabilities()
        if not self.allow_pkcs1:
            algorithms -= {Algorithm.RSA_PKCS1_V1_5}
        return algorithms

    # --- reading ---------------------------------------------------------------------------------------------

    def list_keys(self) -> list[KeyRecord]:
        with self._lock:
            records = list(self._records.values())
        return sorted(records, key=lambda r: (r.created, r.id))

    def get_key(self, key_id: str) -> KeyRecord:
        record = self._records.get(key_id)
        if record is None:
            # A key created a moment ago by another server: look before saying no.
            key_id = parse_key_id(key_id)
            record = self._records.get(key_id)
            if record is None:
                value = self._call("get", key_id)
                if value is None:
                    raise KeyNotFound()
                record = self._remember(value)
        return record

    def refresh(self) -> bool:
        # One listing at a time: a second one would clear _written under the first, which could then install
        # its older copy of a record written meanwhile.
        with self._refresh_lock:
            return self._refresh()

    def _refresh(self) -> bool:
        with self._lock:
            self._written.clear()
        records: dict[str, KeyRecord] = {}
        for value in self._call("list"):
            try:
                record = _record_from_meta(value)
            except (ValueError, KeyError, TypeError, LkmError):
                log.warning("ignoring unreadable lkm metadata object on the token")
                continue
            records[record.id] = record
        with self._lock:
            for key_id in self._written:  # written while the listing ran: what we wrote is newer
                if key_id in self._records:
                    records[key_id] = self._records[key_id]
            changed = records != self._records
            if changed:
                self._records = records
                for gone in set(self._sizes) - set(records):
                    self._sizes.pop(gone, None)
        return changed

    def _remember(self, value: bytes) -> KeyRecord:
        try:
            record = _record_from_meta(value)
        except (ValueError, KeyError, TypeError, LkmError):
            raise KeyStoreError("unreadable lkm metadata object on the token") from None
        with self._lock:
            self._records[record.id] = record
            self._written.add(record.id)
        return record

    def check(self) -> None:
        self._call("check")
        if self._probed is None:
            self._probe()

    def worker_pids(self) -> list[int]:
        """Process ids of the live HSM workers (diagnostics, tests)."""
        return self._pool.worker_pids()

    @property
    def token_info(self) -> dict[str, Any]:
        """Label, serial, model and library of the token, as the last worker to log in saw them."""
        return dict(self._pool.token_info)

    def close(self) -> None:
        self._pool.close()

    # --- decryption ------------------------------------------------------------------------------------------

    def decrypt_loop(self, key_id: str, ciphertexts: list[bytes], algorithm: Algorithm, seconds: float) -> int:
        """Decrypts in a loop inside one worker's session for `seconds`; the count (lkm bench --raw)."""
        record = self._usable(key_id, algorithm)
        count: int = self._call("decrypt_loop", record.id, ciphertexts, algorithm.value, seconds,
                                timeout=seconds + self._pool.op_timeout)
        return count

    def _usable(self, key_id: str, algorithm: Algorithm) -> KeyRecord:
        if algorithm not in self.supported_algorithms():
            raise UnsupportedAlgorithm(f"this key store does not support {algorithm.value}")
        record = self.get_key(key_id)
        if record.state is KeyState.DESTROYED:
            raise KeyUnusable("key has been destroyed", code="key_destroyed")
        return record

    def decrypt(self, key_id: str, ciphertext: bytes, algorithm: Algorithm) -> bytes:
        record = self._usable(key_id, algorithm)
        if len(ciphertext) != self._modulus_bytes(record):
            raise DecryptionFailed()
        try:
            plaintext: bytes = self._call("decrypt", record.id, ciphertext, algorithm.value)
        except _Rejected:
            return self._implicit_rejection(record.id, ciphertext)
        if algorithm is Algorithm.RSA_PKCS1_V1_5 and len(plaintext) != PKCS1_PLAINTEXT_BYTES:
            return self._implicit_rejection(record.id, ciphertext)
        return plaintext

    def _implicit_rejection(self, key_id: str, ciphertext: bytes) -> bytes:
        digest = hmac.new(self._rejection_secret, key_id.encode() + ciphertext, hashlib.sha256).digest()
        return digest[:PKCS1_PLAINTEXT_BYTES]

    def _modulus_bytes(self, record: KeyRecord) -> int:
        size = self._sizes.get(record.id)
        if size is None:
            size = (record.public_key.key_size + 7) // 8
            self._sizes[record.id] = size
        return size

    # --- writing ---------------------------------------------------------------------------------------------

    def create_key(self, *, state: KeyState, label: str = "") -> KeyRecord:
        now = utcnow()
        key_id = new_key_id()
        doc = _doc_from_record(KeyRecord(id=key_id, state=state, created=now, updated=now, public_key_der=b"",
                                         backend=self.backend, label=label))
        with self._write_lock:
            value = self._call("create", key_id, doc, timeout=_KEYGEN_TIMEOUT)
        record = self._remember(value)
        log.info("key %s generated on the token; this key store decrypts %s", record.id,
                 ", ".join(sorted(a.value for a in self.supported_algorithms())))
        return record

    def import_key(self, key_id: str, private_key: rsa.RSAPrivateKey, *, state: KeyState,
                   label: str = "") -> KeyRecord:
        key_id = parse_key_id(key_id)
        if not self.allow_import:
            raise Conflict("this key store does not accept plaintext private keys (keystore.allow_import is "
                           "false); generate keys on the token instead", code="import_unsupported")
        check_rsa_policy(private_key)
        private = private_key.private_numbers()
        public = private.public_numbers
        numbers = {"n": public.n, "e": public.e, "d": private.d, "p": private.p, "q": private.q,
                   "dmp1": private.dmp1, "dmq1": private.dmq1, "iqmp": private.iqmp}
        now = utcnow()
        doc = _doc_from_record(KeyRecord(id=key_id, state=state, created=now, updated=now,
                                         public_key_der=public_der_pkcs1(private_key.public_key()),
                                         backend=self.backend, label=label, extra={"imported": True}))
        with self._write_lock:
            value, _created = self._call("import", key_id, numbers, doc)
        return self._remember(value)

    def save_record(self, record: KeyRecord) -> KeyRecord:
        doc = _doc_from_record(record.with_changes(updated=utcnow()))
        with self._write_lock:
            value = self._call("save", record.id, doc)
        return self._remember(value)

    def destroy_private(self, key_id: str) -> KeyRecord:
        key_id = parse_key_id(key_id)
        with self._write_lock:
            value = self._call("destroy", key_id, format_time(utcnow()))
        return self._remember(value)

    # --- the edge: worker answers to lkm errors --------------------------------------------------------------

    def _call(self, op: str, *args: Any, timeout: float | None = None) -> Any:
        try:
            return self._pool.call(op, *args, timeout=timeout)
        except _Remote as remote:
            kind, text = remote.kind, remote.text
        if kind == "not_found":
            raise KeyNotFound()
        if kind == "destroyed":
            raise KeyUnusable("key has been destroyed", code="key_destroyed")
        if kind == "decrypt_failed":
            raise DecryptionFailed()
        if kind == "rejected":
            raise _Rejected()
        if kind == "conflict":
            raise Conflict(text, code="key_exists")
        if kind == "illegal":
            raise IllegalTransition(text)
        if kind == "import_refused":
            raise Conflict(f"this key store cannot import the key: {text}", code="import_unsupported")
        raise KeyStoreError(text or f"HSM error during {op}")


class _Rejected(Exception):
    """The token rejected PKCS#1 v1.5 padding; never leaves this module."""
