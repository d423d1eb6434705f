"""The server side of the process model: a pool of token workers, each used by one caller thread at a time.

A caller checks a worker out of an idle queue, sends one request over its pipe, waits for the answer and checks
it back in. A token failure, or a dead or stuck worker, retires every worker of that generation; the next call
spawns fresh ones (throttled to one attempt per `retry_interval`). A fatal answer (wrong PIN, no module) keeps
the store down until the configuration is fixed: a real HSM locks a user after a few wrong PINs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import queue
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, NoReturn

from lkm.errors import KeyStoreError, WorkerFailure
from lkm.keystore.pkcs11.entry import worker_main
from lkm.keystore.pkcs11.protocol import OK, SPAWN_TIMEOUT, STOP_TIMEOUT, Fail, Op, TokenConfig

if TYPE_CHECKING:
    from multiprocessing.context import SpawnContext, SpawnProcess

log = logging.getLogger("lkm.keystore.pkcs11")

START_ATTEMPTS = 3
"""Attempts to reach the token at start-up before the store starts unavailable (and retries later)."""
START_RETRY_SECONDS = 0.2


class _Slot:
    """One worker position in the pool; its process is replaced when it fails."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: SpawnProcess | None = None
        self.conn: Connection | None = None
        self.epoch = -1


class WorkerPool:
    def __init__(self, config: TokenConfig, pin: Callable[[], bytes], size: int, *,
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
        """Spawns every worker at once; raises KeyStoreError (transient when the token is merely away).

        A transient failure is tried again a few times at once: SoftHSM2's file store, opened by several
        processes together (two server processes, each with its sessions), now and then answers one of them
        NoSuchToken or GeneralError for a token that is there (6 of 120 processes in a trial of four at a
        time). Without the retries that server process started without its store and answered 503 until the
        next attempt a `retry_interval` later.
        """
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self._start_once()
                return
            except KeyStoreError as exc:
                if not exc.transient or attempt == START_ATTEMPTS:
                    raise
                log.info("HSM not available at start-up, attempt %d of %d (%s); trying again", attempt,
                         START_ATTEMPTS, exc)
                time.sleep(START_RETRY_SECONDS)

    def _start_once(self) -> None:
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
        process = self._ctx.Process(target=worker_main, args=(child_conn, self._config),
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
            self.token_info = self._roundtrip(slot, Op.HELLO, (pin,), SPAWN_TIMEOUT)
        except WorkerFailure as remote:
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
                    conn.send((Op.STOP.value, ()))
            conn.close()
        if process is not None:
            process.join(STOP_TIMEOUT if graceful else 0)
            if process.is_alive():
                process.kill()
                process.join(STOP_TIMEOUT)
            try:
                process.close()
            except ValueError:
                log.warning("HSM worker process %s would not exit", process.pid)

    def _failed_attempt(self) -> None:
        with self._lock:
            self._last_failure = time.monotonic()
            self.healthy = False

    # --- calls -----------------------------------------------------------------------------------------------

    def call(self, op: Op, *args: Any, timeout: float | None = None) -> Any:
        """Runs `op` on an idle worker, (re)spawning it first when needed. Raises WorkerFailure or KeyStoreError."""
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

    def send_nowait(self, op: Op, *args: Any) -> _Slot | None:
        """Sends `op` to a worker that is idle and running, without waiting; its answer comes from `answer()`.
        None when there is none (all busy, or one must be started first): the caller takes `call()` instead."""
        if self._closed or self.fatal is not None:
            return None
        try:
            slot = self._idle.get_nowait()
        except queue.Empty:
            return None
        conn = slot.conn
        if conn is None or slot.epoch != self._epoch:
            self._idle.put(slot)
            return None
        try:
            conn.send((op.value, args))
        except (OSError, ValueError):
            self._idle.put(slot)  # the worker is gone: call() on it starts another
            return None
        return slot

    async def answer(self, slot: _Slot, op: Op) -> Any:
        """Awaits on the event loop the answer of an `op` that send_nowait() gave `slot`, then checks the worker
        back in. No thread waits: the loop watches the worker's pipe. A worker that does not answer within the
        operation timeout, or whose caller gave up, is stopped (the next call starts another)."""
        loop = asyncio.get_running_loop()
        conn = slot.conn
        answered: asyncio.Future[bool] = loop.create_future()

        def settle(readable: bool) -> None:
            if not answered.done():
                answered.set_result(readable)

        received = False
        try:
            if conn is None:
                raise KeyStoreError("HSM worker is not running")
            fd = conn.fileno()
            loop.add_reader(fd, settle, True)
            timer = loop.call_later(self.op_timeout, settle, False)
            try:
                readable = await answered
            finally:
                loop.remove_reader(fd)
                timer.cancel()
            if not readable:
                self._unanswered(slot, op, self.op_timeout)
            reply = self._receive(slot, op)
            received = True
            return self._interpret(slot, op, reply)
        finally:
            if not received:
                # Cancelled, or failed before the answer was read: the next caller of this worker would read
                # this answer as its own, so the worker goes (the next call starts another).
                self._stop(slot, graceful=False)
            self._idle.put(slot)

    def _receive(self, slot: _Slot, op: Op) -> Any:
        conn = slot.conn
        try:
            if conn is None:
                raise EOFError
            return conn.recv()
        except (EOFError, OSError, ValueError):
            code = slot.process.exitcode if slot.process is not None else None
            self._stop(slot, graceful=False)
            self._failed_attempt()
            raise KeyStoreError(f"HSM worker {slot.index} died during {op} (exit code {code})") from None

    def _roundtrip(self, slot: _Slot, op: Op, args: tuple[Any, ...], timeout: float) -> Any:
        conn = slot.conn
        if conn is None:
            raise KeyStoreError("HSM worker is not running")
        try:
            conn.send((op.value, args))
            answered = conn.poll(timeout)
        except (OSError, ValueError):
            answered = True  # _receive reports the dead worker
        if not answered:
            self._unanswered(slot, op, timeout)
        return self._interpret(slot, op, self._receive(slot, op))

    def _unanswered(self, slot: _Slot, op: Op, timeout: float) -> NoReturn:
        """A worker stuck on an operation: stopped, and its generation retired as after a token failure."""
        self._stop(slot, graceful=False)
        self._token_failed(slot, f"HSM worker {slot.index} did not answer {op} within {timeout:.0f} s")

    def _interpret(self, slot: _Slot, op: Op, reply: Any) -> Any:
        if reply[0] == OK:
            return reply[1]
        kind, text = Fail(reply[1]), reply[2]
        if kind is Fail.TOKEN:
            self._stop(slot, graceful=False)
            self._token_failed(slot, text)
        if kind is Fail.FATAL:
            # A wrong PIN, an unloadable module, an ambiguous token: retrying would not help (and a real HSM
            # locks a user after a few wrong PINs), so the store stays down until the configuration is fixed.
            self._stop(slot, graceful=False)
            with self._lock:
                self.fatal = text
                self.healthy = False
            raise KeyStoreError(text, transient=False)
        raise WorkerFailure(kind, text)

    def _token_failed(self, slot: _Slot, text: str) -> NoReturn:
        """Retires every worker of this generation: their library instances may all be stale."""
        with self._lock:
            if slot.epoch == self._epoch:
                self._epoch += 1
                if self.healthy:
                    log.warning("HSM failure, re-initializing the token workers: %s", text)
            self.healthy = False
            self._last_failure = time.monotonic()
        raise KeyStoreError(text)
