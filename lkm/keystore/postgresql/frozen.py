"""The frozen callers of every replica, in the key store's database (table `lkm_frozen_callers`).

With the file list beside each replica's audit log, `lkm freeze` on one machine would stop a caller on that
machine only. Here the list is one table: `lkm freeze` (any machine) and the breaker (any replica) write it in
a write transaction of the store, whose commit notifies every replica ("frozen:<id>"); each replica reloads the
list on that notification (on the listener's thread) and on its refresh tick (on a worker thread), never on
the event loop. Requests read the list held in memory. With the database away, the list loaded last stays in
force, and `lkm freeze` fails (nothing is changed without its record).
"""

from __future__ import annotations

import logging

from lkm.errors import KeyStoreError
from lkm.freeze import FreezeMode, Frozen, HeldList
from lkm.keystore import KeyStore
from lkm.keystore.postgresql.store import PostgresKeyStore

log = logging.getLogger("lkm.keystore.postgresql")

PAYLOAD_PREFIX = "frozen:"


class ClusterFreezeList(HeldList):
    """lkm.freeze.FrozenList on the PostgreSQL key store's database."""

    def __init__(self, store: PostgresKeyStore, *, follow: bool = False) -> None:
        """`follow`: reload whenever a change is heard (a server); the CLI reads and writes only."""
        super().__init__()
        self._store = store
        if follow:
            store.subscribe(self._heard)

    @classmethod
    def of(cls, store: KeyStore, *, follow: bool = False) -> ClusterFreezeList:
        if not isinstance(store, PostgresKeyStore):
            raise KeyStoreError(f"the {store.backend} key store keeps no frozen callers", transient=False)
        return cls(store, follow=follow)

    # --- reading (servers) ----------------------------------------------------------------------------------

    def poll(self) -> bool:
        """Nothing to do on the event loop: the notification and the refresh tick keep the list current."""
        return False

    def refresh(self) -> bool:
        try:
            entries = self.read()
        except KeyStoreError as exc:
            log.warning("frozen callers not reloaded; keeping the last list: %s", exc)
            return False
        return self._replace(entries)

    def _heard(self, payloads: frozenset[str] | None) -> None:
        if payloads is None or any(p.startswith(PAYLOAD_PREFIX) for p in payloads):
            self.refresh()

    def read(self) -> dict[str, Frozen]:
        with self._store.connection() as conn:
            rows = conn.execute("SELECT id, mode, frozen_by, extract(epoch FROM frozen_at), reason "
                                "FROM lkm_frozen_callers").fetchall()
        entries: dict[str, Frozen] = {}
        for caller, mode, by, at, reason in rows:
            try:
                entries[caller] = Frozen(id=caller, mode=FreezeMode(mode), by=by, at=float(at), reason=reason)
            except ValueError:  # a mode this version does not know: the strictest reading
                entries[caller] = Frozen(id=caller, mode=FreezeMode.STOP, by=by, at=float(at), reason=reason)
        return entries

    # --- writing (CLI, breaker) -----------------------------------------------------------------------------

    def put(self, entry: Frozen) -> bool:
        with self._store.writing(PAYLOAD_PREFIX + entry.id) as conn:
            row = conn.execute(
                "INSERT INTO lkm_frozen_callers (id, mode, frozen_by, frozen_at, reason) "
                "VALUES (%s, %s, %s, to_timestamp(%s), %s) ON CONFLICT (id) DO UPDATE SET mode = EXCLUDED.mode, "
                "frozen_by = EXCLUDED.frozen_by, frozen_at = EXCLUDED.frozen_at, reason = EXCLUDED.reason "
                "WHERE lkm_frozen_callers.mode <> EXCLUDED.mode RETURNING id",
                (entry.id, entry.mode.value, entry.by, entry.at, entry.reason)).fetchone()
        return row is not None

    def remove(self, caller: str) -> bool:
        with self._store.writing(PAYLOAD_PREFIX + caller) as conn:
            row = conn.execute("DELETE FROM lkm_frozen_callers WHERE id = %s RETURNING id", (caller,)).fetchone()
        return row is not None
