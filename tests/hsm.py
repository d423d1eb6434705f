"""SoftHSM2 tokens for tests, with no global state: one private token directory per test session.

Every token lives under one temporary directory whose `softhsm2.conf` (made from softhsm/softhsm2.conf.template)
is exported as SOFTHSM2_CONF for the whole session, so HSM worker processes, which inherit the environment when
they are spawned, always see the same configuration. Tests tell tokens apart by label; a test that simulates a
removed token moves that token's own directory away, leaving the others alone.

tests/conftest.py shares the fixtures with every test; a test module must not import them again (see there).
Without softhsm2-util, HSM tests fail when CI is set (they must run there) and are skipped elsewhere.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lkm.keystore.pkcs11 import Pkcs11KeyStore

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "softhsm" / "softhsm2.conf.template"
MAKE_TOKEN = ROOT / "softhsm" / "make-token.sh"
MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)
SO_PIN = "so-pin-0000"
_labels = itertools.count(1)


@dataclass(frozen=True)
class SoftHsmToken:
    conf: Path
    module: Path
    label: str
    pin_file: Path
    token_dir: Path  # this token's own directory inside the SoftHSM token directory

    def pin(self) -> bytes:
        return self.pin_file.read_bytes().strip()

    def store(self, **options: Any) -> Pkcs11KeyStore:
        return Pkcs11KeyStore(self.module, token_label=self.label, pin=self.pin, **options)


def find_module() -> Path | None:
    for candidate in MODULE_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    return None


def require_softhsm() -> Path:
    """The SoftHSM2 module path; fails in CI and skips elsewhere when SoftHSM2 is not installed."""
    module = find_module()
    missing = [what for what, ok in (("softhsm2-util", shutil.which("softhsm2-util")), ("libsofthsm2.so", module))
               if not ok]
    if missing:
        reason = (f"SoftHSM2 is not installed ({', '.join(missing)} missing): apt-get install softhsm2 "
                  "(tests/run installs it)")
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"HSM tests must run in CI: {reason}")
        pytest.skip(reason)
    assert module is not None
    return module


def softhsm_environment(directory: Path) -> Path:
    """Writes DIR/softhsm2.conf for the token directory DIR/tokens and exports it as SOFTHSM2_CONF."""
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(TEMPLATE.read_text().replace("@TOKENDIR@", str(tokens)))
    os.environ["SOFTHSM2_CONF"] = str(conf)
    return conf


def create_token(conf: Path, module: Path, label: str | None = None, pin: str | None = None) -> SoftHsmToken:
    """Initializes a new token (next free slot) in the SoftHSM directory of `conf`."""
    label = label or f"lkm-test-{os.getpid()}-{next(_labels)}"
    pin = pin or f"pin-{label}"
    tokens = conf.parent / "tokens"
    before = set(tokens.iterdir())
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", SO_PIN,
                    "--pin", pin], check=True, capture_output=True, env={**os.environ, "SOFTHSM2_CONF": str(conf)})
    (token_dir,) = set(tokens.iterdir()) - before
    pin_file = conf.parent / f"{label}.pin"
    pin_file.write_text(pin + "\n")
    pin_file.chmod(0o600)
    return SoftHsmToken(conf=conf, module=module, label=label, pin_file=pin_file, token_dir=token_dir)


# --- fixtures -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def softhsm_conf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(SOFTHSM2_CONF path, module path) of this session's private SoftHSM2 directory."""
    module = require_softhsm()
    previous = os.environ.get("SOFTHSM2_CONF")
    conf = softhsm_environment(tmp_path_factory.mktemp("softhsm"))
    yield conf, module
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


@pytest.fixture
def softhsm_token(softhsm_conf: tuple[Path, Path]) -> SoftHsmToken:
    """A fresh, empty token for one test."""
    return create_token(*softhsm_conf)


@pytest.fixture(scope="module")
def module_token(softhsm_conf: tuple[Path, Path]) -> SoftHsmToken:
    """A token shared by the tests of one module."""
    return create_token(*softhsm_conf)


@pytest.fixture(scope="module")
def pkcs11_store(module_token: SoftHsmToken) -> Iterator[Pkcs11KeyStore]:
    """A key store on the module's token, with two worker processes (the default pool size)."""
    store = module_token.store()
    yield store
    store.close()
