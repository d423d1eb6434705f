"""Entry point of a worker process (multiprocessing "spawn"): one TokenWorker answering over a pipe."""

from __future__ import annotations

import os
import signal
from multiprocessing.connection import Connection
from typing import Any

from lkm.errors import WorkerFailure
from lkm.keystore.pkcs11.protocol import ERR, OK, Fail, Op, TokenConfig
from lkm.keystore.pkcs11.worker import TokenWorker
from lkm.threadnames import name_this_thread


def worker_main(conn: Connection, config: TokenConfig) -> None:
    """Entry point of a worker process: answers requests on `conn` until told to stop or the server is gone."""
    name_this_thread("lkm-token")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the server, which stops its workers itself
    os.environ.update(dict(config.env))  # set before the module loads; the server's own environment is untouched
    worker: TokenWorker | None = None
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            break
        if op == Op.STOP:
            break
        try:
            if op == Op.HELLO:
                if worker is None:
                    worker = TokenWorker(config, args[0])
                reply: tuple[Any, ...] = (OK, worker.describe())
            elif worker is None:
                reply = (ERR, Fail.ERROR.value, "worker not initialized")
            else:
                reply = (OK, getattr(worker, "op_" + Op(op).value)(*args))
        except Exception as exc:
            failure = worker.classify(exc, op) if worker is not None else _classify_early(exc, op)
            reply = (ERR, failure.kind.value, failure.text)
        try:
            conn.send(reply)
        except (OSError, ValueError):
            break
    if worker is not None:
        worker.close()
    conn.close()


def _classify_early(exc: BaseException, op: str) -> WorkerFailure:
    """An error while the library was being loaded or the token found: the token (or its directory) is away."""
    if isinstance(exc, WorkerFailure):
        return exc
    name = type(exc).__name__
    if type(exc).__module__.startswith("pkcs11"):
        return WorkerFailure(Fail.TOKEN, f"PKCS#11 {name} while opening the token ({op})")
    return WorkerFailure(Fail.ERROR, f"{name} while opening the token ({op})")
