"""The test suite. Importing it (pytest does, before any conftest) shares compiled bytecode across the run.

With PYTHONDONTWRITEBYTECODE set (container images and some CI machines set it), nothing is cached: every test
process compiles lkm again, and every pytest-xdist worker rewrites the asserts of all ~100 test modules again
(2 s of CPU a worker), and so does every `lkm` child process a test starts. The variable is there to keep
`__pycache__` out of the source tree, so the tree stays clean: the bytecode goes to a private directory of this
user's under the temporary directory instead (PYTHONPYCACHEPREFIX), for this process and its children, and is
reused by the next run. A directory that is not this user's own, or open to others, is not used (bytecode read
from it would run as test code).
"""

from __future__ import annotations

import atexit
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path


def _share_bytecode() -> None:
    if not os.environ.get("PYTHONDONTWRITEBYTECODE") or sys.pycache_prefix:
        return
    directory = Path(tempfile.gettempdir()) / f"lkm-tests-pycache-{os.getuid()}"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        found = directory.lstat()
    except OSError:
        return
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
        return
    sys.pycache_prefix = str(directory)
    sys.dont_write_bytecode = False
    os.environ["PYTHONPYCACHEPREFIX"] = str(directory)
    del os.environ["PYTHONDONTWRITEBYTECODE"]


_share_bytecode()


def _skip_the_system_ca_bundle() -> None:
    """No test trusts the system's certificate authorities: every certificate is made by the tests and every
    client is given its CA (the stand-in platform speaks plain HTTP). Yet importing aiohttp builds a default
    client context, which parses the whole system bundle: about 0.14 s of CPU in each of the few hundred
    server, worker and CLI processes a run starts. An empty bundle (SSL_CERT_FILE and SSL_CERT_DIR, which
    OpenSSL reads) for this process's children skips that. What reaches the network on its own (pip in the
    container test) is given the system's bundle back."""
    if "SSL_CERT_FILE" in os.environ or "SSL_CERT_DIR" in os.environ:
        return  # set by the environment, or by the pytest process that started this one
    directory = Path(tempfile.mkdtemp(prefix="lkm-tests-no-ca-"))  # this user's alone: nobody slips a CA in
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    empty = directory / "none.pem"
    empty.write_bytes(b"")
    os.environ["SSL_CERT_FILE"] = str(empty)
    os.environ["SSL_CERT_DIR"] = str(directory / "none")  # a directory that does not exist: no certificates


_skip_the_system_ca_bundle()
