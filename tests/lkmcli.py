"""The real `lkm` command line: in a child process, as an operator runs it (`lkm`), or through the same
`lkm.cli.main` in this process (`lkm_here`).

A child process costs an interpreter start and lkm's imports, about 0.2 s of CPU, on top of what the command
does. Tests of what a command does (its output, exit status, audit records, refusals) call `lkm_here`; tests of
the process itself (the entry point, exit on a signal, kill -9, standard input, concurrent processes) and at
least one test of each command family keep `lkm`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import subprocess
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path

from lkm.cli import main

LKM = [sys.executable, "-m", "lkm"]


def lkm(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*LKM, *args], capture_output=True, text=True, check=False, timeout=120,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"lkm {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


_one_at_a_time = threading.Lock()  # standard streams, environment and directory are the process's own


@contextlib.contextmanager
def _environment(env: dict[str, str] | None, cwd: Path | str | None) -> Iterator[None]:
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.update(env or {})
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def lkm_here(*args: str, check: bool = True, env: dict[str, str] | None = None, drop_env: tuple[str, ...] = (),
             stdin: bytes = b"", cwd: Path | str | None = None) -> subprocess.CompletedProcess[str]:
    """`lkm ARGS` through `lkm.cli.main` in this process, answered as `lkm` answers: exit status, standard output
    and standard error. `env` is added to the environment and `drop_env` taken out for the call.

    What a child process would show is kept visible: an exception that escapes `main` becomes a traceback on
    standard error and status 1, argparse's exits keep their status, and log records of WARNING and above go
    to standard error, as Python's last-resort handler writes them in a process without logging set up.
    When called on a thread that runs an event loop, the command runs on a thread of its own (commands use
    asyncio.run), and that loop waits for it."""
    def call() -> subprocess.CompletedProcess[str]:
        out, err = io.StringIO(), io.StringIO()
        fake_stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
        handler = logging.StreamHandler(err)
        handler.setLevel(logging.WARNING)
        root = logging.getLogger()
        with _one_at_a_time, _environment(env, cwd), contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err):
            for name in drop_env:
                os.environ.pop(name, None)
            saved_stdin, sys.stdin = sys.stdin, fake_stdin
            root.addHandler(handler)
            try:
                status = main(list(args))
            except SystemExit as exc:  # argparse: --help, --version, usage errors
                status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
                if isinstance(exc.code, str):
                    print(exc.code, file=err)
            except BaseException:  # what the interpreter would print, for the test to see
                err.write(traceback.format_exc())
                status = 1
            finally:
                root.removeHandler(handler)
                sys.stdin = saved_stdin
        return subprocess.CompletedProcess(["lkm", *args], status, out.getvalue(), err.getvalue())

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        result = call()
    else:
        box: list[subprocess.CompletedProcess[str]] = []
        worker = threading.Thread(target=lambda: box.append(call()), name="lkm-cli-here")
        worker.start()
        worker.join()
        result = box[0]
    if check and result.returncode != 0:
        raise AssertionError(f"lkm {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result
