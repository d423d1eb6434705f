"""`lkm check-config`: the configuration, and the key store opened with the secrets the server would use.

Each check prints `[ok]` or `[FAIL]`; the first failure is the one error line (exit 1). Opening the key store
is read-only: a file store is opened without creating anything and one key unwraps a test value (that proves
the passphrase unseals keys, not just the header); a PKCS#11 token is logged in to and its key unwraps the
same way; a PostgreSQL store connects. `--offline` skips the key store, and says so.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from lkm.cli.common import settings_of
from lkm.config import Settings
from lkm.errors import CliError, ConfigError, KeyStoreError, LkmError
from lkm.keys import PADDINGS, Algorithm, KeyState, load_public_pkcs1
from lkm.keystore import KeyStore

TEST_VALUE_BYTES = 32


def _tls(settings: Settings) -> str:
    from lkm.tlsconf import tls_context  # noqa: PLC0415 - the contexts a server start and a reload would load
    from lkm.web.routes import ListenerName  # noqa: PLC0415

    done = [f"{name}.tls" for name in (ListenerName.PLATFORM, ListenerName.NATIVE)
            if tls_context(settings, name) is not None]
    return (", ".join(done) or "no TLS listener") + ": certificates and keys load"


def read_secrets(settings: Settings) -> str:
    """Reads every secret the configuration names (ConfigError naming the first unreadable one)."""
    refs = [r for r in (settings.keystore.passphrase, settings.keystore.pin, settings.keystore.dsn) if r]
    refs += [ref.key for ref in settings.platform.hawk.credentials]
    for ref in refs:
        ref.read_bytes()
    return f"{len(refs)} secret(s) readable: " + (", ".join(r.setting for r in refs) or "none")


def _keystore(settings: Settings) -> str:
    from lkm.keystore.open import open_keystore  # noqa: PLC0415 - keeps `lkm --help` fast

    ks = settings.keystore
    if ks.type == "file":
        assert ks.path is not None and ks.passphrase is not None
        if not (Path(ks.path) / "keystore.json").exists():
            return f"file store {ks.path}: not created yet (the server creates it at first start); " \
                   f"the passphrase is checked then"
        from lkm.keystore.file import FileKeyStore  # noqa: PLC0415

        store: KeyStore = FileKeyStore(Path(ks.path), ks.passphrase.read_bytes(), create=False)
    elif ks.type == "postgresql":
        from lkm.keystore.postgresql.schema import CODE_VERSION, inspect  # noqa: PLC0415 - optional extra

        assert ks.dsn is not None
        found = inspect(ks.dsn.read_text(), ks.connect_timeout)  # KeyStoreError when newer than this code
        if found == 0:
            return f"postgresql store: reachable, lkm schema not created yet (the server creates it at first " \
                   f"start, version {CODE_VERSION}); the passphrase is checked then"
        store = open_keystore(ks)
    else:
        store = open_keystore(ks)
    try:
        records = sorted((r for r in store.list_keys() if r.state is not KeyState.DESTROYED),
                         key=lambda r: r.state is not KeyState.ACTIVE)
        opened = f"{ks.type} store opened, {len(records)} usable key(s)"
        if not records:
            return opened + "; no key to unwrap a test value with"
        record = records[0]
        value = os.urandom(TEST_VALUE_BYTES)
        wrapped = load_public_pkcs1(record.public_key_der).encrypt(value, PADDINGS[Algorithm.RSA_OAEP_SHA1])
        if store.decrypt(record.id, wrapped, Algorithm.RSA_OAEP_SHA1) != value:
            raise KeyStoreError(f"key {record.id} did not unwrap a test value correctly")
        return opened + f"; key {record.id} unwrapped a test value"
    finally:
        store.close()


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    checks: list[tuple[str, Callable[[Settings], str]]] = [("tls", _tls), ("secrets", read_secrets)]
    if args.offline:
        print("  [skipped] keystore: --offline: the key store was not opened; the passphrase, PIN or "
              "database are unchecked")
    else:
        checks.append(("keystore", _keystore))
    for name, check in checks:
        try:
            print(f"  [ok] {name}: {check(settings)}")
        except (ConfigError, KeyStoreError, LkmError, OSError) as exc:
            text = exc.message if isinstance(exc, LkmError) else str(exc)
            print(f"  [FAIL] {name}: {text}")
            raise CliError(f"{settings.source}: check {name} failed: {text}",
                           status=2 if isinstance(exc, ConfigError) else 1) from None
    print(f"{settings.source}: configuration is valid" + (" (key store not checked: --offline)"
                                                          if args.offline else ""))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--offline", action="store_true",
                        help="skip opening the key store (no passphrase, PIN or database check)")
