"""The PKCS#11 key store: the server-process half, which never loads the token library itself.

Reads come from a cache of records refreshed from the token's metadata; every token call goes through the
worker pool. Errors of the token library never reach callers: they become KeyNotFound, KeyUnusable,
DecryptionFailed, UnsupportedAlgorithm, Conflict, or KeyStoreError whose text (for logs) names the PKCS#11 error
class only. The PIN and key material appear in no exception text and no log line.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
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
    WorkerFailure,
)
from lkm.keys import (
    Algorithm,
    KeyRecord,
    KeyState,
    check_rsa_policy,
    format_time,
    new_key_id,
    parse_key_id,
    public_der_pkcs1,
    utcnow,
)
from lkm.keystore import HELD_STATES, check_ciphertext_length, check_usable, synthetic_plaintext, usable_record
from lkm.keystore.pkcs11.meta import BACKEND, doc_from_record, record_from_meta
from lkm.keystore.pkcs11.pool import WorkerPool
from lkm.keystore.pkcs11.protocol import (
    INSTALL_HINT,
    KEYGEN_TIMEOUT,
    PKCS1_PLAINTEXT_BYTES,
    Fail,
    Op,
    TokenConfig,
    pkcs11_available,
)

if TYPE_CHECKING:
    from lkm.config import KeyStoreSettings

log = logging.getLogger("lkm.keystore.pkcs11")


class Pkcs11KeyStore:
    backend = BACKEND

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
        self._listed = False  # the token's keys read once: until then _records says nothing (see list_keys)
        self._written: set[str] = set()  # ids this store wrote since the last refresh began
        self._refresh_lock = threading.Lock()  # _written belongs to one refresh at a time
        self._sizes: dict[str, int] = {}
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._rejection_secret: bytes | None = None  # read from the token (Op.SECRET) when first needed
        self._probed: frozenset[Algorithm] | None = None
        self._next_probe = 0.0
        self._retry_interval = retry_interval
        if callable(pin):
            pin_source = pin
        else:
            fixed_pin = bytes(pin)

            def pin_source() -> bytes:
                return fixed_pin

        config = TokenConfig(os.fspath(module), token_label, token_serial, tuple(module_env))
        self._pool = WorkerPool(config, pin_source, pool_size, retry_interval=retry_interval,
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
            names = self._pool.call(Op.PROBE, timeout=KEYGEN_TIMEOUT)
        except WorkerFailure as remote:
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
        if not self._listed:
            # A token away since start-up has not been read: an empty list would tell an operator that the keys
            # are gone, and the rotation schedule that one is due.
            raise KeyStoreError("HSM not available: the token's keys have not been read yet")
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
                value = self._call(Op.GET, key_id)
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
        if self.allow_pkcs1:
            # Read again each time: two processes that made the secret at once agree on one from here on.
            self._rejection_secret = self._call(Op.SECRET)
        with self._lock:
            self._written.clear()
        records: dict[str, KeyRecord] = {}
        for value in self._call(Op.LIST):
            try:
                record = record_from_meta(value)
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
            self._listed = True
        return changed

    def _remember(self, value: bytes) -> KeyRecord:
        try:
            record = record_from_meta(value)
        except (ValueError, KeyError, TypeError, LkmError):
            raise KeyStoreError("unreadable lkm metadata object on the token") from None
        with self._lock:
            self._records[record.id] = record
            self._written.add(record.id)
        return record

    def check(self) -> None:
        self._call(Op.CHECK)
        if self._probed is None:
            self._probe()
        if not self._listed:  # ready only once the keys are known
            self.refresh()

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
        record = usable_record(self, key_id, algorithm, HELD_STATES)
        count: int = self._call(Op.DECRYPT_LOOP, record.id, ciphertexts, algorithm.value, seconds,
                                timeout=seconds + self._pool.op_timeout)
        return count

    def decrypt(self, key_id: str, ciphertext: bytes, algorithm: Algorithm) -> bytes:
        record = usable_record(self, key_id, algorithm, HELD_STATES)
        check_ciphertext_length(ciphertext, self._key_bits(record))
        try:
            plaintext: bytes = self._call(Op.DECRYPT, record.id, ciphertext, algorithm.value)
        except _Rejected:
            # A padding the token rejected: never an error (that would be an oracle). The service replaces any
            # answer of the wrong length by the same synthetic value (platform.pkcs1_data_key_length).
            return self.synthetic_plaintext(record.id, ciphertext, PKCS1_PLAINTEXT_BYTES)
        return plaintext

    def start_decrypt(self, key_id: str, ciphertext: bytes, algorithm: Algorithm,
                      states: frozenset[KeyState]) -> Awaitable[bytes] | None:
        """StartsDecrypts: the operation goes to an idle worker's pipe at once; the caller's event loop awaits
        the answer. PKCS#1 v1.5 stays on decrypt(): a rejected padding's answer may need the secret's token call."""
        record = self._records.get(key_id)
        if record is None or algorithm is Algorithm.RSA_PKCS1_V1_5:
            return None
        check_usable(self, record, algorithm, states)
        check_ciphertext_length(ciphertext, self._key_bits(record))
        slot = self._pool.send_nowait(Op.DECRYPT, record.id, ciphertext, algorithm.value)
        return None if slot is None else self._answer_of(slot, Op.DECRYPT)

    async def _answer_of(self, slot: Any, op: Op) -> Any:
        try:
            return await self._pool.answer(slot, op)
        except WorkerFailure as remote:
            raise self._failure(op, remote) from None

    def synthetic_plaintext(self, key_id: str, ciphertext: bytes, length: int) -> bytes:
        secret = self._rejection_secret
        if secret is None:
            secret = self._rejection_secret = self._call(Op.SECRET)
        return synthetic_plaintext(secret, key_id, ciphertext, length)

    def _key_bits(self, record: KeyRecord) -> int:
        bits = self._sizes.get(record.id)
        if bits is None:
            bits = record.public_key.key_size
            self._sizes[record.id] = bits
        return bits

    # --- writing ---------------------------------------------------------------------------------------------

    def create_key(self, *, state: KeyState, label: str = "", key_id: str | None = None) -> KeyRecord:
        now = utcnow()
        key_id = key_id or new_key_id()
        doc = doc_from_record(KeyRecord(id=key_id, state=state, created=now, updated=now, public_key_der=b"",
                                         backend=self.backend, label=label))
        with self._write_lock:
            value = self._call(Op.CREATE, key_id, doc, timeout=KEYGEN_TIMEOUT)
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
        doc = doc_from_record(KeyRecord(id=key_id, state=state, created=now, updated=now,
                                         public_key_der=public_der_pkcs1(private_key.public_key()),
                                         backend=self.backend, label=label, extra={"imported": True}))
        with self._write_lock:
            value, _created = self._call(Op.IMPORT, key_id, numbers, doc)
        return self._remember(value)

    def save_record(self, record: KeyRecord) -> KeyRecord:
        doc = doc_from_record(record.with_changes(updated=utcnow()))
        with self._write_lock:
            value = self._call(Op.SAVE, record.id, doc)
        return self._remember(value)

    def destroy_private(self, key_id: str) -> KeyRecord:
        key_id = parse_key_id(key_id)
        with self._write_lock:
            value = self._call(Op.DESTROY, key_id, format_time(utcnow()))
        return self._remember(value)

    # --- the edge: worker answers to lkm errors --------------------------------------------------------------

    def _call(self, op: Op, *args: Any, timeout: float | None = None) -> Any:
        try:
            return self._pool.call(op, *args, timeout=timeout)
        except WorkerFailure as remote:
            raise self._failure(op, remote) from None

    @staticmethod
    def _failure(op: Op, remote: WorkerFailure) -> Exception:
        """The lkm error a worker's failure answer means."""
        kind, text = remote.kind, remote.text
        if kind is Fail.NOT_FOUND:
            return KeyNotFound()
        if kind is Fail.DESTROYED:
            return KeyUnusable("key has been destroyed", code="key_destroyed")
        if kind is Fail.DECRYPT_FAILED:
            return DecryptionFailed()
        if kind is Fail.REJECTED:
            return _Rejected()
        if kind is Fail.CONFLICT:
            return Conflict(text, code="key_exists")
        if kind is Fail.ILLEGAL:
            return IllegalTransition(text)
        if kind is Fail.IMPORT_REFUSED:
            return Conflict(f"this key store cannot import the key: {text}", code="import_unsupported")
        return KeyStoreError(text or f"HSM error during {op.value}")


class _Rejected(Exception):
    """The token rejected PKCS#1 v1.5 padding; never leaves this module."""
