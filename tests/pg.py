"""A throwaway PostgreSQL cluster for tests: Debian's initdb/pg_ctl, a temporary directory, no global state.

One cluster per test session (started on first use, stopped at the end); each test takes a fresh database
(CREATE DATABASE ... TEMPLATE template0), so tests never see each other's rows. The server listens on a unix
socket in its directory (for the tests' own administration) and on a free TCP port on 127.0.0.1 with password
authentication (what lkm uses, as in production). PostgreSQL refuses to run as root, so under root (CI) the
cluster runs as an unprivileged user (`lkmtest`, created when absent) via runuser.

Tests import the fixtures they use: `from tests.pg import pg_cluster, pg_dsn`.
Without PostgreSQL's server binaries, these tests fail when CI is set (they must run there; tests/run installs
them) and are skipped elsewhere.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

TEST_USER = "lkmtest"
SUPERUSER = "lkm"
_databases = itertools.count(1)


def find_bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PgCluster:
    """One running PostgreSQL server in a temporary directory; stop() and start() simulate an outage."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="lkm-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.password = secrets.token_urlsafe(16)
        self.run_as: str | None = None
        if os.geteuid() == 0:
            self.run_as = _unprivileged_user()
            entry = pwd.getpwnam(self.run_as)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.root.chmod(0o700)
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.run_as:
            entry = pwd.getpwnam(self.run_as)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--pwfile", str(pwfile),
                  "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
        pwfile.unlink()
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin_dir / tool), *args]
        if self.run_as:
            command = ["runuser", "-u", self.run_as, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.root, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stdout}{done.stderr}")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c max_connections=200 -c shared_buffers=16MB")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options,
                  "-w", "-t", "60", "start")

    def stop(self) -> None:
        """A clean fast shutdown: clients are disconnected at once, as when an operator stops the database."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def is_running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def admin(self, dbname: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(host=str(self.root), port=self.port, user=SUPERUSER, dbname=dbname,
                               autocommit=True)

    def create_database(self) -> str:
        name = f"lkm_test_{next(_databases)}"
        with self.admin() as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        return name

    def dsn(self, dbname: str) -> str:
        """What lkm is configured with: TCP and a password, never the trusted local socket."""
        return (f"host=127.0.0.1 port={self.port} dbname={dbname} user={SUPERUSER} "
                f"password={self.password} sslmode=disable")

    def destroy(self) -> None:
        if self.is_running():
            with contextlib.suppress(RuntimeError):
                self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _unprivileged_user() -> str:
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
                       check=True, capture_output=True)
    return TEST_USER


_cluster: PgCluster | None = None


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """The session's cluster. Shared by every module that imports this fixture (one server per run)."""
    global _cluster  # noqa: PLW0603 - one server per test run, whichever module asks first
    bin_dir = find_bin_dir()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL server binaries not found under /usr/lib/postgresql (tests/run installs them)")
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    if _cluster is None:
        _cluster = PgCluster(bin_dir)
    yield _cluster
    if _cluster is not None:
        _cluster.destroy()
        _cluster = None


@pytest.fixture
def pg_dsn(pg_cluster: PgCluster) -> str:
    """A fresh, empty database of its own for one test."""
    if not pg_cluster.is_running():
        pg_cluster.start()  # a test that stopped the server and failed before starting it again
    return pg_cluster.dsn(pg_cluster.create_database())
