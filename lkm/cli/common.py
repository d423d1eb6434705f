"""What every command shares: the settings, the key store, the audit record of a CLI action, the output."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lkm.audit.record import AuditAction
from lkm.changes import Applied, KeyChange
from lkm.config import KeyStoreType, Settings, load_settings
from lkm.errors import CliError
from lkm.events import Intent, audit_event
from lkm.keys import KeyRecord, public_key_views
from lkm.keystore import KeyStore
from lkm.lifecycle import ChangeFacts

DEFAULT_DEV_DIR = "lkm-dev"

AddCommand = Callable[..., argparse.ArgumentParser]
"""add(name, func, help, parent): a sub-command with the shared -c/--config option."""


def configured_path(args: argparse.Namespace) -> str | None:
    """The config file named by -c or LKM_CONFIG, if any."""
    return getattr(args, "config", None) or os.environ.get("LKM_CONFIG")


def config_path(args: argparse.Namespace) -> str:
    path = configured_path(args)
    if not path:
        raise CliError("no configuration: pass -c FILE or set LKM_CONFIG", status=2)
    return str(path)


def settings_of(args: argparse.Namespace) -> Settings:
    return load_settings(config_path(args))


def open_store(settings: Settings) -> KeyStore:
    from lkm.keystore.open import open_keystore  # noqa: PLC0415 - keeps `lkm --help` fast

    return open_keystore(settings.keystore)


@contextlib.contextmanager
def cluster_store(settings: Settings) -> Iterator[KeyStore | None]:
    """The key store opened when it is PostgreSQL (the database every replica shares: credentials, frozen
    callers), else None; closed on the way out."""
    store = open_store(settings) if settings.keystore.type is KeyStoreType.POSTGRESQL else None
    try:
        yield store
    finally:
        if store is not None:
            store.close()


def read_input(name: str) -> bytes:
    """A file's bytes, or standard input's for "-"."""
    return Path(name).read_bytes() if name != "-" else sys.stdin.buffer.read()


def cli_origin() -> dict[str, Any]:
    from lkm.audit import local_actor  # noqa: PLC0415

    return {"request_id": None, "actor": local_actor(), "route": "cli"}


def write_event(settings: Settings, event: dict[str, Any]) -> None:
    from lkm.audit import AuditLog  # noqa: PLC0415

    settings.audit.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    AuditLog.from_settings(settings.audit).record_sync(event)


def audit(settings: Settings, action: AuditAction, key_id: str | None, outcome: str = "ok", *,
          error_code: str | None = None, **extra: Any) -> None:
    """Writes the audit record of one CLI action to the same trail the server writes."""
    write_event(settings, audit_event(cli_origin(), action, key_id, outcome=outcome, error_code=error_code,
                                 extra=extra))


class IntendedChange:
    """The outcome side of an announced change: what `intended` writes when the block ends (facts may be added)."""

    def __init__(self, intent: Intent) -> None:
        self.intent = intent
        self.details: dict[str, Any] = {}


@contextlib.contextmanager
def intended(settings: Settings, action: AuditAction, key_id: str | None, **extra: Any) -> Iterator[IntendedChange]:
    """Announces a change durably before it is made, and records its outcome after, success or failure.

    If the process dies in between, the trail holds the intent without an outcome, which `lkm audit verify`
    reports: the change may have happened, and no change can have happened without a record.
    """
    origin = cli_origin()
    change = IntendedChange(Intent(action, key_id, extra))
    write_event(settings, change.intent.event(origin))
    try:
        yield change
    except BaseException as exc:
        write_event(settings, change.intent.outcome(origin, exc, extra=change.details))
        raise
    write_event(settings, change.intent.outcome(origin, extra=change.details))


def apply(settings: Settings, change: KeyChange, *, store: KeyStore | None = None) -> Applied:
    """Makes one change, announced before and audited after, success or refusal: on `store` when given (the
    caller closes it), else on a freshly opened store."""
    target = store if store is not None else open_store(settings)
    facts = ChangeFacts()
    try:
        with intended(settings, change.action, change.key_id) as done:
            try:
                record = change.apply(target, facts)
            finally:
                done.details.update(facts.audit_details())
    finally:
        if store is None:
            target.close()
    return Applied(record, facts)


def transition_line(applied: Applied) -> str:
    """"id: before -> after"."""
    before = applied.facts.from_state or applied.record.state
    return f"{applied.record.id}: {before.value} -> {applied.record.state.value}"


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def key_lines(record: KeyRecord) -> str:
    views = public_key_views(record)
    return "\n".join([
        f"id:        {record.id}",
        f"state:     {record.state.value}",
        f"created:   {record.to_json()['created']}",
        f"backend:   {record.backend}",
        *([f"label:     {record.label}"] if record.label else []),
        "public key (platform format, base64 DER PKCS#1):",
        views["public_key_pkcs1_b64"],
        "public key (PEM SubjectPublicKeyInfo):",
        views["public_key_pem"].rstrip(),
    ])


def show_key(args: argparse.Namespace, record: KeyRecord, text: str) -> None:
    """The record as JSON with --json, else `text`."""
    if getattr(args, "json", False):
        print_json({**record.to_json(), **public_key_views(record)})
    else:
        print(text)
