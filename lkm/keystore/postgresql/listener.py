"""The thread that hears other replicas' changes: LISTEN on a connection of its own.

A notification makes the store reload at once (well under a second), instead of waiting for the server's next
refresh tick; on_change gets the payloads heard ("key:<id>", "hawk:<id>", "frozen:<id>"), or None after a
(re)connect, when anything may have changed; the tick still reloads on its own, which heals a notification lost
while this connection was down. The thread also notices first when the database goes away or comes back, and
says so (on_down / on_up), reconnecting with a capped back-off; after a reconnect it reloads, since
notifications sent meanwhile are lost.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import sql

from lkm.errors import KeyStoreError

log = logging.getLogger("lkm.keystore.postgresql")

_POLL_SECONDS = 0.5  # how long one wait for notifications lasts: bounds how late stop() is heard
_MAX_BACKOFF_SECONDS = 5.0


class Listener:
    def __init__(self, connect: Callable[[], psycopg.Connection[Any]], channel: str, *,
                 on_change: Callable[[frozenset[str] | None], None], on_down: Callable[[str], None],
                 on_up: Callable[[], None]) -> None:
        self._connect = connect
        self._channel = channel
        self._on_change = on_change
        self._on_down = on_down
        self._on_up = on_up
        self._stopping = threading.Event()
        self.connected = threading.Event()  # set while LISTEN is in force (tests wait on it)
        self._thread = threading.Thread(target=self._run, name="lkm-pg-listen", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=_POLL_SECONDS * 4 + 1)

    def _run(self) -> None:
        backoff = _POLL_SECONDS
        while not self._stopping.is_set():
            try:
                with self._connect() as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
                    self.connected.set()
                    self._on_up()
                    self._on_change(None)  # whatever changed while nobody listened
                    backoff = _POLL_SECONDS
                    self._wait(conn)
            except (psycopg.Error, KeyStoreError) as exc:
                self.connected.clear()
                if self._stopping.is_set():
                    break
                self._on_down(f"listening for changes: {describe(exc)}")
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)
        self.connected.clear()

    def _wait(self, conn: psycopg.Connection[Any]) -> None:
        while not self._stopping.is_set():
            payloads = {note.payload for note in conn.notifies(timeout=_POLL_SECONDS, stop_after=1)}
            if payloads:
                self._on_change(frozenset(payloads))


def describe(exc: BaseException) -> str:
    """One log line about a database failure: the class and the first line of libpq's text (no DSN in it)."""
    lines = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {lines[0] if lines else 'no detail'}"
