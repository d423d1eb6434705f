"""The worker side: runs in the spawned processes, the only place that imports python-pkcs11.

One TokenWorker per process: its own library instance, logged in once, one session, a cache of private-key
handles. lkm.keystore.pkcs11.entry runs it in the worker process.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import secrets
import time
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from lkm.errors import IllegalTransition, WorkerFailure
from lkm.keys import (
    DESTRUCTION_RULE,
    KEY_BITS,
    PADDINGS,
    PUBLIC_EXPONENT,
    Algorithm,
    KeyState,
    b64,
    check_transition,
    public_der_pkcs1,
)
from lkm.keystore.pkcs11.meta import (
    META_APPLICATION,
    META_LABEL_PREFIX,
    SECRET_BYTES,
    SECRET_LABEL,
    encode_meta,
    parse_meta,
    public_numbers,
    revision,
)
from lkm.keystore.pkcs11.protocol import (
    INSTALL_HINT,
    KEY_LABEL_PREFIX,
    PKCS1_PLAINTEXT_BYTES,
    PROBE_BITS,
    Fail,
    TokenConfig,
    key_id_bytes,
)


class TokenWorker:
    """One process's library instance, its logged-in session and its cache of private-key handles."""

    def __init__(self, config: TokenConfig, pin: str) -> None:
        self.config = config
        try:
            self.p11: Any = importlib.import_module("pkcs11")
        except ImportError:
            raise WorkerFailure(Fail.FATAL, INSTALL_HINT) from None
        self.exc: Any = self.p11.exceptions
        self.A: Any = self.p11.Attribute
        try:
            self.lib: Any = self.p11.lib(config.module)
        except self.exc.PKCS11Error as exc:
            if type(exc) is self.exc.PKCS11Error and "loading" in str(exc):
                raise WorkerFailure(Fail.FATAL, f"cannot load the PKCS#11 module {config.module}") from None
            raise
        self.token: Any = self._find_token()
        try:
            self.session: Any = self.token.open(rw=True, user_pin=pin)
        except (self.exc.PinIncorrect, self.exc.PinInvalid, self.exc.PinLenRange, self.exc.PinLocked,
                self.exc.PinExpired, self.exc.UserPinNotInitialized) as exc:
            raise WorkerFailure(Fail.FATAL, f"the token refused the user PIN ({type(exc).__name__}); "
                                "check keystore.pin") from None
        self.handles: dict[str, Any] = {}

    # --- plumbing --------------------------------------------------------------------------------------------

    def _find_token(self) -> Any:
        serial = self.config.token_serial.encode() if self.config.token_serial else None
        try:
            return self.lib.get_token(token_label=self.config.token_label, token_serial=serial)
        except self.exc.NoSuchToken:
            raise WorkerFailure(Fail.TOKEN, f"no token {self._token_name()} (yet)") from None
        except self.exc.MultipleTokensReturned:
            raise WorkerFailure(Fail.FATAL, f"several tokens match {self._token_name()}; set token_serial") from None

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
            raise WorkerFailure(Fail.TOKEN, f"token {self._token_name()} does not answer "
                                f"({type(exc).__name__})") from None
        if info.label != self.token.label or info.serial != self.token.serial:
            raise WorkerFailure(Fail.TOKEN, f"the slot no longer holds token {self._token_name()}")

    def _request_errors(self) -> tuple[type[BaseException], ...]:
        """Errors about one request (a template, a mechanism): the token itself is fine."""
        e = self.exc
        return (e.AttributeTypeInvalid, e.AttributeValueInvalid, e.AttributeReadOnly, e.AttributeSensitive,
                e.TemplateIncomplete, e.TemplateInconsistent, e.MechanismInvalid, e.MechanismParamInvalid,
                e.KeySizeRange, e.KeyTypeInconsistent, e.FunctionNotSupported, e.FunctionRejected,
                e.DomainParamsInvalid, e.ArgumentsBad, e.DeviceMemory, e.TokenWriteProtected)

    def classify(self, exc: BaseException, op: str) -> WorkerFailure:
        if isinstance(exc, WorkerFailure):
            return exc
        if isinstance(exc, self._request_errors()):
            return WorkerFailure(Fail.ERROR, f"the token refused {op} (PKCS#11 {type(exc).__name__})")
        if isinstance(exc, self.exc.PKCS11Error):
            detail = str(exc)[:120] if type(exc) is self.exc.PKCS11Error else ""
            return WorkerFailure(Fail.TOKEN,
                                 f"PKCS#11 {type(exc).__name__}{': ' + detail if detail else ''} during {op}")
        return WorkerFailure(Fail.ERROR, f"{type(exc).__name__} during {op}")

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
            doc = parse_meta(obj[A.VALUE])
            if doc is not None and doc.get("id") == key_id:
                found.append((obj, doc))
        return found

    def read_meta(self, key_id: str) -> dict[str, Any] | None:
        found = self._meta_objects(key_id)
        if not found:
            self.assert_token()  # an empty answer from a token that went away is not "no such key"
            return None
        return max(found, key=lambda item: revision(item[1]))[1]

    def write_meta(self, key_id: str, doc: dict[str, Any]) -> bytes:
        """Stores the next revision of a key's metadata, then removes the older ones."""
        A = self.A
        old = self._meta_objects(key_id)
        doc = dict(doc, seq=max((int(d.get("seq", 0)) for _, d in old), default=0) + 1)
        value = encode_meta(doc)
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
            raise WorkerFailure(Fail.NOT_FOUND)
        if doc.get("state") == KeyState.DESTROYED.value:
            raise WorkerFailure(Fail.DESTROYED)
        modulus = public_numbers(doc).n
        for candidate in candidates:
            # The private key that matches the registered public key, not merely one with the same CKA_ID.
            if int.from_bytes(candidate[self.A.MODULUS], "big") == modulus:
                self.handles[key_id] = candidate
                return candidate
        self.assert_token()
        raise WorkerFailure(Fail.MISSING, f"key {key_id}: the token holds its metadata but not its private key")

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

    def op_secret(self) -> bytes:
        """The store's secret for synthetic PKCS#1 answers: a private data object on the token, made by the first
        process that needs it. Two made at once by two processes: every reader takes the smallest, so all agree
        from their next read on (the store reads it again at each refresh)."""
        A = self.A
        template = {A.CLASS: self.p11.ObjectClass.DATA, A.APPLICATION: META_APPLICATION, A.LABEL: SECRET_LABEL}

        def read() -> list[bytes]:
            found = (bytes(obj[A.VALUE]) for obj in self.session.get_objects(template))
            return [value for value in found if len(value) == SECRET_BYTES]

        values = read()
        if not values:
            self.assert_token()
            self.session.create_object({**template, A.TOKEN: True, A.PRIVATE: True,
                                        A.VALUE: secrets.token_bytes(SECRET_BYTES)})
            values = read()  # another process may have made one at the same time: all take the smallest
        return min(values)

    def op_list(self) -> list[bytes]:
        """The newest metadata revision of every key on the token."""
        A = self.A
        self.assert_token()
        best: dict[str, tuple[tuple[int, bytes], bytes]] = {}
        for obj in self.session.get_objects({A.CLASS: self.p11.ObjectClass.DATA,
                                             A.APPLICATION: META_APPLICATION}):
            value = obj[A.VALUE]
            doc = parse_meta(value)
            if doc is None or not isinstance(doc.get("id"), str):
                continue
            if obj[A.LABEL] != META_LABEL_PREFIX + doc["id"]:
                continue
            rank = revision(doc)
            if doc["id"] not in best or rank > best[doc["id"]][0]:
                best[doc["id"]] = (rank, value)
        self.assert_token()  # an empty listing from a vanished token must not look like "no keys"
        return [value for _, value in best.values()]

    def op_get(self, key_id: str) -> bytes | None:
        doc = self.read_meta(key_id)
        return None if doc is None else encode_meta(doc)

    def op_create(self, key_id: str, doc: dict[str, Any]) -> bytes:
        A = self.A
        if self._meta_objects(key_id):
            raise WorkerFailure(Fail.CONFLICT, f"key {key_id} exists already")
        self._remove_orphans(key_id)
        pub, priv = self.session.generate_keypair(
            self.p11.KeyType.RSA, KEY_BITS, id=key_id_bytes(key_id), label=KEY_LABEL_PREFIX + key_id,
            store=True, public_template=self._public_key_template(key_id),
            private_template=self._private_key_template(key_id))
        try:
            numbers = rsa.RSAPublicNumbers(int.from_bytes(pub[A.PUBLIC_EXPONENT], "big"),
                                           int.from_bytes(pub[A.MODULUS], "big"))
            if numbers.e != PUBLIC_EXPONENT or numbers.n.bit_length() != KEY_BITS:
                raise WorkerFailure(Fail.ERROR, f"the token generated RSA-{numbers.n.bit_length()} e={numbers.e}")
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
                raise WorkerFailure(Fail.CONFLICT, f"key {key_id} already exists with different key material")
            return encode_meta(existing), False
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
            raise WorkerFailure(Fail.IMPORT_REFUSED,
                                f"the token refused the imported key (PKCS#11 {type(exc).__name__})") from None
        except BaseException:
            self._destroy_quietly(created)
            raise
        self.handles[key_id] = created[0]
        return value, True

    def op_save(self, key_id: str, doc: dict[str, Any]) -> bytes:
        current = self.read_meta(key_id)
        if current is None:
            raise WorkerFailure(Fail.NOT_FOUND)
        if current.get("public_key") != doc.get("public_key"):
            raise WorkerFailure(Fail.ERROR, f"key {key_id}: refusing to change the public key of a stored key")
        return self.write_meta(key_id, doc)

    def op_destroy(self, key_id: str, updated: str) -> bytes:
        """Marks the key destroyed first (so no server uses it any more), then destroys its private half."""
        current = self.read_meta(key_id)
        if current is None:
            raise WorkerFailure(Fail.NOT_FOUND)
        try:
            # Checked on the token itself: another server may have enabled the key since we last looked.
            check_transition(KeyState(str(current.get("state"))), KeyState.DESTROYED, DESTRUCTION_RULE)
        except IllegalTransition as exc:
            raise WorkerFailure(Fail.ILLEGAL, exc.message) from None
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
        """A token may give the handle of a destroyed object to a new one, so a cached handle is checked to be
        this key's. PKCS#1 v1.5 checks before decrypting: another key's answer would pass as an implicit
        rejection. OAEP checks only after a failure: another key fails OAEP's own integrity check (all but
        certainly), which saves a token call (C_GetAttributeValue, about 45 µs on SoftHSM2) on every unwrap."""
        algorithm = Algorithm(algorithm_name)
        mechanism, param = self._mechanism(algorithm)
        check_first = algorithm is Algorithm.RSA_PKCS1_V1_5
        for _ in range(2):
            key = self._private_key(key_id)
            try:
                if check_first and not self._is_key(key, key_id):
                    continue
                return bytes(key.decrypt(ciphertext, mechanism=mechanism, mechanism_param=param))
            except (self.exc.ObjectHandleInvalid, self.exc.KeyHandleInvalid):
                self.handles.pop(key_id, None)  # destroyed by another server, or the token went away: look again
            except self.exc.PKCS11Error as exc:
                if not check_first and not self._is_key(key, key_id):
                    continue  # the handle is another object's now: decrypt again with this key's
                if not isinstance(exc, self._crypto_errors()):
                    raise
                if algorithm is Algorithm.RSA_PKCS1_V1_5:
                    # No extra token call here: valid and invalid padding must cost the same.
                    raise WorkerFailure(Fail.REJECTED) from None
                self.assert_token()  # a token in trouble may answer CKR_GENERAL_ERROR too
                raise WorkerFailure(Fail.DECRYPT_FAILED) from None
        self.assert_token()
        raise WorkerFailure(Fail.MISSING, f"key {key_id}: its private key handle keeps going stale")

    def _is_key(self, key: Any, key_id: str) -> bool:
        """Whether a cached handle still names this key's private key; forgets it when not."""
        try:
            if key[self.A.ID] == key_id_bytes(key_id):
                return True
        except (self.exc.ObjectHandleInvalid, self.exc.KeyHandleInvalid, self.exc.AttributeTypeInvalid):
            pass
        self.handles.pop(key_id, None)
        return False
