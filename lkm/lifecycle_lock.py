"""The store's cross-process lock, around every lifecycle step that reads and then writes keys."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from lkm.keystore import KeyStore


@runtime_checkable
class LockingStore(Protocol):
    def lock(self) -> AbstractContextManager[Any]:
        """An exclusive section shared by every process using this store (re-entrant in one thread)."""
        ...


@contextlib.contextmanager
def store_lock(store: KeyStore) -> Iterator[None]:
    """The store's cross-process lock when it has one (the file store's flock).

    Inside it the store is refreshed, so every check sees what other processes wrote before we got the lock. A
    store without one (PKCS#11) gets no cross-process exclusion here; the server serializes its own changes
    (lkm.keyadmin), and the README tells HSM users to let one server run the rotation schedule.
    """
    guard: AbstractContextManager[Any] = store.lock() if isinstance(store, LockingStore) else \
        contextlib.nullcontext()
    with guard:
        store.refresh()
        yield
