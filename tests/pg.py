"""A throwaway PostgreSQL cluster for tests: Debian's initdb/pg_ctl, a temporary directory, no global state.

One cluster per test session (started on first use, stopped at the end); the processes of one run
(pytest-xdist workers) each run their own server (a test may stop it to simulate an outage), but initdb runs
once per run: the first process to need a cluster initializes a template data directory in a run-wide
directory, the others copy it (1 s of CPU less per process). Each test takes a fresh database
(CREATE DATABASE ... TEMPLATE template0), so tests never see each other's rows. The server listens on a unix
socket in its directory (for the tests' own administration) and on a free TCP port on 127.0.0.1 with password
authentication (what lkm uses, as in production). PostgreSQL refuses to run as root, so under root (CI) the
cluster runs as an unprivileged user (`lkmtest`, created when absent) via runuser.

tests/conftest.py shares the fixtures with every test; a test module must not import them again (see there).
Without PostgreSQL's server binaries, these tests fail when CI is set (they must run there; tests/run installs
them) and are skipped elsewhere.
"""

from __future__ import annotations

import contextlib
import fcntl
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

    def __init__(self, bin_dir: Path, template: Path | None = None) -> None:
        """A new cluster in a new temporary directory; with `template` (a directory shared by the processes of
        a run), its data directory is a copy of the one initialized there, by whichever process came first."""
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="lkm-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.run_as: str | None = None
        if os.geteuid() == 0:
            self.run_as = _unprivileged_user()
        self._own(self.root)
        self.root.chmod(0o700)
        if template is None:
            self.password = self._initdb(self.root)
        else:
            self.password = self._copy_template(template)
        self.start()

    def _own(self, path: Path) -> None:
        """`path` belongs to the user the server runs as."""
        if self.run_as:
            entry = pwd.getpwnam(self.run_as)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _initdb(self, root: Path) -> str:
        """A data directory at root/data whose superuser has a new password, returned."""
        password = secrets.token_urlsafe(16)
        pwfile = root / "pwfile"
        pwfile.write_text(password + "\n")
        self._own(pwfile)
        self._run("initdb", "-D", str(root / "data"), "-U", SUPERUSER, "--pwfile", str(pwfile),
                  "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
        pwfile.unlink()
        return password

    def _copy_template(self, template: Path) -> str:
        """This cluster's data directory as a copy (owners and modes kept) of the run's template, initialized
        here first if no process of the run has done it yet; returns its superuser's password."""
        template.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(template / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one process runs initdb; the others wait for it and copy
            password_file = template / "password"
            if password_file.exists():
                _copy_tree(template / "data", self.data)
                return password_file.read_text()
            # initdb here (the template's directory may be closed to the user the server runs as), then the copy.
            password = self._initdb(self.root)
            shutil.rmtree(template / "data", ignore_errors=True)  # a process killed while copying
            _copy_tree(self.data, template / "data")
            password_file.write_text(password)
            password_file.chmod(0o600)
            return password

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


def _copy_tree(source: Path, target: Path) -> None:
    """A copy with owners and modes kept (PostgreSQL refuses a data directory open to others)."""
    done = subprocess.run(["cp", "-a", str(source), str(target)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"copying {source} failed: {done.stderr}")


def _unprivileged_user() -> str:
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TEST_USER],
                       check=True, capture_output=True)
    return TEST_USER


_cluster: PgCluster | None = None


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Iterator[PgCluster]:
    """The session's cluster. Shared by every module that imports this fixture (one server per test process),
    copied from the template the run's processes share (their base temporary directories have one parent)."""
    global _cluster  # noqa: PLW0603 - one server per test run, whichever module asks first
    bin_dir = find_bin_dir()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL server binaries not found under /usr/lib/postgresql (tests/run installs them)")
        pytest.skip("PostgreSQL server binaries not installed (apt-get install postgresql)")
    if _cluster is None:
        base = tmp_path_factory.getbasetemp()
        _cluster = PgCluster(bin_dir, template=(base.parent if worker_id != "master" else base) / "pg-template")
    yield _cluster
    if _cluster is not None:
        _cluster.destroy()
        _cluster = None


def seed_pg_store(dsn: str, passphrase: str) -> None:
    """The schema and the header of a PostgreSQL key store on `dsn`, made by the real store with the tests'
    scrypt cost (TEST_SCRYPT_N), for the servers and CLIs a test then opens on it through their configs: each
    derives its master key at that cost (80 ms at the production cost), as with a seeded file store."""
    from lkm.keystore.postgresql import PostgresKeyStore
    from tests.conftest import TEST_SCRYPT_N

    PostgresKeyStore(dsn, passphrase.encode(), listen=False, scrypt_n=TEST_SCRYPT_N).close()


@pytest.fixture
def pg_dsn(pg_cluster: PgCluster) -> str:
    """A fresh, empty database of its own for one test."""
    if not pg_cluster.is_running():
        pg_cluster.start()  # a test that stopped the server and failed before starting it again
    return pg_cluster.dsn(pg_cluster.create_database())
