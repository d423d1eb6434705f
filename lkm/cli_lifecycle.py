"""The command line of the key lifecycle: rotation, state changes, destruction, bulk import, platform
registration, backup and restore. Every change is audited (`_audit_cli`), refused attempts included."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lkm import backup, lifecycle, migrate
from lkm.cli import CliError, _audit_cli, _open_store, _print_json, _settings
from lkm.config import Settings
from lkm.keys import KeyRecord, KeyState, format_time, parse_key_id, public_key_views
from lkm.keystore import KeyStore

PASSPHRASE_ENV = "LKM_BACKUP_PASSPHRASE"  # noqa: S105 - the name of a variable, not a secret

AddCommand = Callable[..., argparse.ArgumentParser]


def _code(exc: BaseException) -> str:
    return str(getattr(exc, "code", None) or exc.__class__.__name__)


def _change(settings: Settings, action: str, key_id: str | None, func: Callable[..., KeyRecord], *args: Any,
            store: KeyStore | None = None, **kwargs: Any) -> tuple[KeyRecord, dict[str, Any]]:
    """Runs one lifecycle operation and audits it, success or refusal: on `store` when given (the caller closes
    it), else on a freshly opened store."""
    target = store if store is not None else _open_store(settings)
    details: dict[str, Any] = {}
    try:
        record = func(target, *args, details=details, **kwargs)
    except Exception as exc:
        _audit_cli(settings, action, key_id, outcome="error", error_code=_code(exc), **details)
        raise
    finally:
        if store is None:
            target.close()
    _audit_cli(settings, action, record.id, **details)
    return record, details


def _transition(args: argparse.Namespace, action: str, func: Callable[..., KeyRecord],
                **kwargs: Any) -> tuple[KeyRecord, str]:
    """One state change of the key `args.id`: the record after it and the "id: before -> after" line."""
    key_id = parse_key_id(args.id)
    record, details = _change(_settings(args), action, key_id, func, key_id, **kwargs)
    return record, _transition_line(record, details)


def _transition_line(record: KeyRecord, details: dict[str, Any]) -> str:
    before = details.get("from_state", record.state.value)
    return f"{record.id}: {before} -> {record.state.value}"


def _show(args: argparse.Namespace, record: KeyRecord, text: str) -> None:
    if getattr(args, "json", False):
        _print_json({**record.to_json(), **public_key_views(record)})
    else:
        print(text)


# --- rotate, activate, register ------------------------------------------------------------------------

def cmd_keys_rotate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    registration = settings.genesys is not None
    record, details = _change(settings, "rotate_key", None, lifecycle.rotate, registration=registration,
                              label=args.label or "")
    previous = details.get("previous_active") or "(none)"
    if registration:
        print(f"new key {record.id}: pending activation; registering it with the platform "
              f"(key {previous} stays active meanwhile)", file=sys.stderr)
        record = _register(settings, record.id)
    _show(args, record, f"rotated: key {record.id} is {record.state.value}; previously active: {previous}")
    return 0


def cmd_keys_activate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    record, details = _change(settings, "activate_key", parse_key_id(args.id), lifecycle.activate,
                              parse_key_id(args.id))
    retired = details.get("retired")
    print(_transition_line(record, details) + (f" (retired: {retired})" if retired else ""))
    return 0


def cmd_genesys_register(args: argparse.Namespace) -> int:
    settings = _settings(args)
    record = _register(settings, parse_key_id(args.id))
    print(f"key {record.id} is {record.state.value}")
    return 0


def _register(settings: Settings, key_id: str) -> KeyRecord:
    """Registers with the platform (retrying as configured) and activates; CliError when it stays pending."""
    from lkm import genesys  # noqa: PLC0415 - pulls in aiohttp; only this command needs it

    if settings.genesys is None:
        raise CliError(f"{settings.source}: no genesys section; register the public key with the platform by "
                       f"hand, then run `lkm keys activate {key_id}`")
    config = settings.genesys
    owner = f"cli:{socket.gethostname()}:{os.getpid()}"
    store = _open_store(settings)
    try:
        record = store.get_key(key_id)
        if not lifecycle.claim_registration(store, key_id, owner, genesys.registration_lease_seconds(config)):
            holder = lifecycle.registration_holder(store.get_key(key_id))
            raise CliError(f"key {key_id} is being registered by {holder}; wait for it (`lkm keys show {key_id}`)")
    finally:
        store.close()

    async def attempted(attempt: int, error: genesys.RegistrationError | None) -> None:
        fields: dict[str, Any] = {"attempt": attempt, "max_attempts": config.max_attempts}
        if error is None:
            print(f"  attempt {attempt}: registered", file=sys.stderr)
            _audit_cli(settings, "register_key", key_id, **fields)
            return
        retrying = error.retryable and attempt < config.max_attempts
        print(f"  attempt {attempt}: {error}" + (" (retrying)" if retrying else ""), file=sys.stderr)
        _audit_cli(settings, "register_key", key_id, outcome="error", error_code=error.code,
                   error_message=str(error), retrying=retrying, **fields)

    try:
        asyncio.run(genesys.register_key(config, record, on_attempt=attempted))
    except genesys.RegistrationError as exc:
        store = _open_store(settings)
        try:
            lifecycle.release_registration(store, key_id, owner)
            active = ",".join(k.id for k in lifecycle.active_keys(store)) or "(none)"
        finally:
            store.close()
        raise CliError(f"registration failed: {exc}. Key {key_id} stays {record.state.value}; key {active} stays "
                       f"active. Retry with `lkm genesys register {key_id}`") from None
    activated, _ = _change(settings, "activate_key", key_id, lifecycle.mark_registered, key_id)
    return activated


# --- disable, enable, destruction ------------------------------------------------------------------------------

def cmd_keys_disable(args: argparse.Namespace) -> int:
    _, line = _transition(args, "disable_key", lifecycle.disable, force=args.force)
    print(line + "  (unwraps with this key are refused; `lkm keys enable` undoes)")
    return 0


def cmd_keys_enable(args: argparse.Namespace) -> int:
    _, line = _transition(args, "enable_key", lifecycle.enable)
    print(line)
    return 0


def cmd_keys_schedule_destruction(args: argparse.Namespace) -> int:
    record, line = _transition(args, "schedule_destruction", lifecycle.schedule_destruction, days=args.days)
    after = format_time(record.destroy_after) if record.destroy_after else "?"
    print(line + f"; may be destroyed after {after} "
          f"(`lkm keys destroy {record.id}`; `lkm keys cancel-destruction {record.id}` undoes)")
    return 0


def cmd_keys_cancel_destruction(args: argparse.Namespace) -> int:
    _, line = _transition(args, "cancel_destruction", lifecycle.cancel_destruction)
    print(line)
    return 0


def cmd_keys_destroy(args: argparse.Namespace) -> int:
    settings = _settings(args)
    key_id = parse_key_id(args.id)
    store = _open_store(settings)
    try:
        report = lifecycle.destruction_report(store, key_id, audit_path=settings.audit.path)
        print(f"key {key_id} ({report.key.state.value})")
        for check in report.safeguards:
            print(f"  [{'ok' if check.ok else 'FAIL'}] {check.name}: {check.detail}")
        print(f"  last unwrap: {report.last_unwrap_text()}")
        if args.dry_run:
            _audit_cli(settings, "destroy_key_dry_run", key_id, allowed=report.allowed,
                       last_unwrap=format_time(report.last_unwrap) if report.last_unwrap else None)
            print("dry run: destruction " + ("would proceed" if report.allowed else "would be refused"))
            return 0 if report.allowed else 1
        record, _ = _change(settings, "destroy_key", key_id, lifecycle.destroy, key_id, store=store)
    finally:
        store.close()
    print(f"{record.id}: destroyed (private key erased; the metadata stays so unwraps say 'destroyed')")
    return 0


# --- import ------------------------------------------------------------------------------------------------------

def cmd_keys_import_bulk(args: argparse.Namespace) -> int:
    settings = _settings(args)
    data = Path(args.file).read_bytes() if args.file != "-" else sys.stdin.buffer.read()
    try:
        rows = migrate.read_rows(data, args.format)
    except (migrate.ExportUnreadable, UnicodeDecodeError) as exc:
        raise CliError(f"{args.file}: {exc}") from None

    def audit(result: migrate.RowResult, details: dict[str, Any]) -> None:
        if result.outcome == "refused":
            _audit_cli(settings, "import_key", result.key_id, outcome="error",
                       error_code=details.pop("error_code", "import_rejected"), reason=result.reason, **details)
        else:
            _audit_cli(settings, "import_key", result.key_id, **details)

    store = _open_store(settings)
    try:
        results = migrate.import_rows(store, rows, state=KeyState(args.state), activate=args.activate, audit=audit)
    finally:
        store.close()
    for result in results:
        print(result.line())
    counts = {o: sum(r.outcome == o for r in results) for o in ("imported", "unchanged", "refused")}
    print(f"{counts['imported']} imported, {counts['unchanged']} unchanged, {counts['refused']} refused")
    return 1 if counts["refused"] else 0


# --- backup ------------------------------------------------------------------------------------------------------

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


def cmd_backup_create(args: argparse.Namespace) -> int:
    settings = _settings(args)
    passphrase = _passphrase(args)
    store = _open_store(settings)
    path = Path(args.file)
    try:
        bundle = backup.create_backup(store, path, passphrase)
    except backup.BackupError as exc:
        raise CliError(str(exc)) from None
    finally:
        store.close()
    _audit_cli(settings, "backup_create", None, file=str(path.resolve()), keys=len(bundle.keys),
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
    settings = _settings(args)
    bundle = _read(args)
    store: KeyStore = _open_store(settings)
    try:
        results = backup.restore_backup(store, bundle)
    finally:
        store.close()
    for result in results:
        if result.outcome == "restored":
            _audit_cli(settings, "restore_key", result.key_id, to_state=result.state, file=str(Path(args.file)))
        elif result.outcome == "refused":
            _audit_cli(settings, "restore_key", result.key_id, outcome="error", error_code="key_exists",
                       reason=result.reason)
        print(result.line())
    counts = {o: sum(r.outcome == o for r in results) for o in ("restored", "skipped", "refused", "not restored")}
    _audit_cli(settings, "backup_restore", None, file=str(Path(args.file).resolve()),
               counts={k.replace(" ", "_"): v for k, v in counts.items()})
    print(", ".join(f"{v} {k}" for k, v in counts.items()))
    return 1 if counts["refused"] else 0


# --- parser ------------------------------------------------------------------------------------------------------

def add_commands(sub: Any, keys: Any, add: AddCommand) -> None:
    """Adds the lifecycle commands to the parser that lkm.cli builds (`keys` is its keys sub-parser set)."""
    p = add("rotate", cmd_keys_rotate, "make a new key the active one (registering it first if genesys is set)",
            keys)
    p.add_argument("--label")
    p.add_argument("--json", action="store_true")
    p = add("activate", cmd_keys_activate, "activate a key pending activation (the platform has it)", keys)
    p.add_argument("id")
    p = add("disable", cmd_keys_disable, "refuse unwraps with a key until it is enabled again", keys)
    p.add_argument("id")
    p.add_argument("--force", action="store_true",
                   help="also for the active key (an emergency cut-off: new recordings cannot be played back)")
    p = add("enable", cmd_keys_enable, "undo disable", keys)
    p.add_argument("id")
    p = add("schedule-destruction", cmd_keys_schedule_destruction,
            "schedule destruction of a disabled key after a waiting period", keys)
    p.add_argument("id")
    p.add_argument("--days", type=int, default=lifecycle.DEFAULT_DESTRUCTION_DAYS,
                   help=f"waiting period in days (default %(default)s, at least {lifecycle.MIN_DESTRUCTION_DAYS})")
    p = add("cancel-destruction", cmd_keys_cancel_destruction, "cancel a scheduled destruction", keys)
    p.add_argument("id")
    p = add("destroy", cmd_keys_destroy,
            "erase a key's private half for good (only after its scheduled waiting period)", keys)
    p.add_argument("id")
    p.add_argument("--dry-run", action="store_true",
                   help="check the safeguards and show when the key last unwrapped; change nothing")
    p = add("import-bulk", cmd_keys_import_bulk,
            "import keypairs exported from the platform's sample LKM (CSV or JSON with id and private key)", keys)
    p.add_argument("file", help="the export, or - for standard input")
    p.add_argument("--format", choices=("auto", "csv", "json"), default="auto")
    p.add_argument("--state", choices=[s.value for s in (KeyState.RETIRED, KeyState.DISABLED)],
                   default=KeyState.RETIRED.value, help="state of the imported keys (default %(default)s)")
    p.add_argument("--activate", metavar="ID", help="make this imported key the active one (if none is)")

    gen = sub.add_parser("genesys", help="the platform API").add_subparsers(
        dest="genesys_command", required=True, metavar="ACTION")
    p = add("register", cmd_genesys_register,
            "register a key's public half with the platform and activate it", gen)
    p.add_argument("id")

    bak = sub.add_parser("backup", help="encrypted backups of the key store").add_subparsers(
        dest="backup_command", required=True, metavar="ACTION")
    for name, func, text in (
            ("create", cmd_backup_create, "write an encrypted bundle of every key and its metadata"),
            ("verify", cmd_backup_verify, "prove a bundle is whole and decryptable, without restoring"),
            ("restore", cmd_backup_restore, "restore a bundle; never overwrites a different key")):
        p = add(name, func, text, bak)
        p.add_argument("file")
        p.add_argument("--passphrase-file", help=f"file holding the backup passphrase (default: ${PASSPHRASE_ENV})")
