"""Copying every key from one store to another (`lkm keys migrate --to OTHER_CONFIG`): file store to
PostgreSQL when a single server becomes several replicas, and back.

A copy keeps each key's id, state, dates, label and registration status: it is the backup's restore
(lkm.backup) fed straight from the source store, so the two cannot disagree on what a key is made of, and it is
safe to run again (a key already present and identical is skipped, a different key under the same id is
refused and left alone). Every key that has a private half is then proved on the target by a real unwrap of a
random value wrapped with its public key; the source is never changed. A destroyed key is copied as its record
alone (state destroyed, no private half) where the target takes one (lkm.keystore.RecordImporting).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from lkm import backup
from lkm.errors import KeyStoreError, LkmError
from lkm.keys import PADDINGS, Algorithm
from lkm.keystore import KeyStore

PROBE_ALGORITHM = Algorithm.RSA_OAEP_SHA1  # offered by every store


@dataclass(frozen=True)
class CopyResult(backup.KeyResult):
    """A restore's result with the copy's own words for its outcome ("copied" | "present" | "refused" |
    "not copied") and the one thing a restore cannot know: whether the key proved itself on the target."""

    verified: bool = False  # a test unwrap on the target gave back what was wrapped

    def notes(self) -> list[str]:
        return (["unwrap verified"] if self.verified else []) + super().notes()


_OUTCOMES = {"restored": "copied", "skipped": "present", "refused": "refused", "not restored": "not copied"}


def copy_keys(source: KeyStore, target: KeyStore) -> list[CopyResult]:
    keys = backup.collect_keys(source)
    bundle = backup.Bundle(created="", backend=source.backend, private_keys=True, keys=keys)
    results = []
    for item, restored in zip(keys, backup.restore_backup(target, bundle), strict=True):
        outcome, reason = _OUTCOMES[restored.outcome], restored.reason
        verified = False
        if outcome in ("copied", "present") and item.private_key is not None:
            verified, problem = prove(target, item)
            if not verified:
                outcome, reason = "refused", problem
        results.append(CopyResult(item.record.id, outcome, reason, restored.state, verified))
    return results


def prove(target: KeyStore, item: backup.BundleKey) -> tuple[bool, str]:
    """A random value wrapped with the key's public half must come back from the target's private half."""
    probe = secrets.token_bytes(32)
    wrapped = item.record.public_key.encrypt(probe, PADDINGS[PROBE_ALGORITHM])
    try:
        ok = secrets.compare_digest(target.decrypt(item.record.id, wrapped, PROBE_ALGORITHM), probe)
    except LkmError as exc:
        return False, f"test unwrap on the target failed: {exc.message}"
    except KeyStoreError as exc:
        return False, f"test unwrap on the target failed: {exc}"
    return ok, "" if ok else "test unwrap on the target gave back other bytes"
