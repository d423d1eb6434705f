"""`lkm backup create|verify|restore`: encrypted bundles of the key store, each step audited."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from lkm import backup
from lkm.audit.record import AuditAction
from lkm.cli.common import AddCommand, audit, cli_origin, open_store, settings_of, write_event
from lkm.errors import CliError
from lkm.events import Intent

PASSPHRASE_ENV = "LKM_BACKUP_PASSPHRASE"  # noqa: S105 - the name of a variable, not a secret


def _passphrase(args: argparse.Namespace) -> bytes:
    if args.passphrase_file:
        try:
            return Path(args.passphrase_file).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise CliError(f"cannot read {args.passphrase_file}: {exc.strerror}") from None
    value = os.environ.get(PASSPHRASE_ENV)
    if not value:
        raise CliError(f"no backup passphrase: pass --passphrase-file FILE or set {PASSPHRASE_ENV}", status=2)
    return value.encode("utf-8")


def _writable_target(path: Path, *, force: bool) -> None:
    """Refuses, before any work, a bundle path that exists (without --force) or cannot be written."""
    parent = path.parent
    if path.is_dir():
        raise CliError(f"{path} is a directory; name the bundle file, e.g. {path / 'lkm-backup.json'}")
    if path.exists() and not force:
        raise CliError(f"{path} exists; pass --force to overwrite it, or choose another file name")
    if not parent.is_dir():
        raise CliError(f"{parent}: no such directory; create it (mkdir -p {parent}) or choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"{parent}: not writable by this user; choose another path")


def cmd_backup_create(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    path = Path(args.file)
    _writable_target(path, force=args.force)
    passphrase = _passphrase(args)
    store = open_store(settings)
    try:
        bundle = backup.create_backup(store, path, passphrase)
    except backup.BackupError as exc:
        raise CliError(str(exc)) from None
    finally:
        store.close()
    audit(settings, AuditAction.BACKUP_CREATE, None, file=str(path.resolve()), keys=len(bundle.keys),
          key_ids=[k.record.id for k in bundle.keys], private_keys=bundle.private_keys)
    print(f"{path}: {len(bundle.keys)} key(s) backed up"
          + ("" if bundle.private_keys else " (metadata only: back the HSM up with its own tools)"))
    return 0


def _read(args: argparse.Namespace) -> backup.Bundle:
    try:
        return backup.read_backup(Path(args.file), _passphrase(args))
    except backup.BackupError as exc:
        raise CliError(str(exc)) from None


def cmd_backup_verify(args: argparse.Namespace) -> int:
    bundle = _read(args)
    with_private = sum(k.private_key is not None for k in bundle.keys)
    print(f"{args.file}: OK, whole and decryptable; created {bundle.created} from a {bundle.backend} store; "
          f"{len(bundle.keys)} key(s), {with_private} with a private key that matches its public key")
    for item in bundle.keys:
        print(f"  {item.record.id}  {item.record.state.value}")
    return 0


def cmd_backup_restore(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    bundle = _read(args)
    intents: dict[str, Intent] = {}

    def announce(key_id: str) -> None:
        # Written before the key goes into the store, so that a crash cannot leave it without a record.
        intents[key_id] = intent = Intent(AuditAction.RESTORE_KEY, key_id, {"file": str(Path(args.file))})
        write_event(settings, intent.event(cli_origin()))

    store = open_store(settings)
    try:
        results = backup.restore_backup(store, bundle, before=announce)
    finally:
        store.close()
    for result in results:
        intent = intents.pop(result.key_id, None)
        paired = intent.pairing() if intent is not None else {}
        if result.outcome == "restored":
            audit(settings, AuditAction.RESTORE_KEY, result.key_id, to_state=result.state, file=str(Path(args.file)),
                  **paired)
        elif result.outcome == "refused":
            audit(settings, AuditAction.RESTORE_KEY, result.key_id, outcome="error", error_code="key_exists",
                  reason=result.reason, **paired)
        print(result.line())
    counts = {o: sum(r.outcome == o for r in results) for o in ("restored", "skipped", "refused", "not restored")}
    audit(settings, AuditAction.BACKUP_RESTORE, None, file=str(Path(args.file).resolve()),
          counts={k.replace(" ", "_"): v for k, v in counts.items()})
    print(", ".join(f"{v} {k}" for k, v in counts.items()))
    return 1 if counts["refused"] else 0


def add_commands(sub: Any, add: AddCommand) -> None:
    bak = sub.add_parser("backup", help="encrypted backups of the key store").add_subparsers(
        dest="backup_command", required=True, metavar="ACTION")
    for name, func, text in (
            ("create", cmd_backup_create, "write an encrypted bundle of every key and its metadata"),
            ("verify", cmd_backup_verify, "prove a bundle is whole and decryptable, without restoring"),
            ("restore", cmd_backup_restore, "restore a bundle; never overwrites a different key")):
        p = add(name, func, text, bak)
        if func is cmd_backup_create:
            p.add_argument("file", metavar="OUTPUT", help="the bundle to write")
            p.add_argument("--force", action="store_true", help="overwrite an existing bundle")
        else:
            p.add_argument("file", help="the bundle to read")
        p.add_argument("--passphrase-file", help=f"file holding the backup passphrase (default: ${PASSPHRASE_ENV})")
