"""`lkm keys ...`: list and show keys, create and import them, and every state change of their lifecycle.

Each change is the same KeyChange the admin API applies (lkm.changes), audited here, refusals included.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lkm import changes, lifecycle, migrate
from lkm.audit.record import AuditAction
from lkm.cli import genesys
from lkm.cli.common import (
    AddCommand,
    apply,
    audit,
    cli_origin,
    intended,
    key_lines,
    open_store,
    print_json,
    read_input,
    settings_of,
    show_key,
    transition_line,
    write_event,
)
from lkm.errors import CliError, IllegalTransition, LkmError
from lkm.events import Intent
from lkm.keys import KeyState, format_time, load_private_key_any, parse_key_id, public_key_views
from lkm.lifecycle import ChangeFacts

# --- reading -------------------------------------------------------------------------------------------------

def cmd_keys_list(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    store = open_store(settings)
    try:
        records = store.list_keys()
    finally:
        store.close()
    if args.json:
        print_json([{**r.to_json(), "public_key_pkcs1_b64": public_key_views(r)["public_key_pkcs1_b64"]}
                    for r in records])
        return 0
    print(f"{'ID':36}  {'STATE':19}  {'CREATED':20}  LABEL")
    for record in records:
        print(f"{record.id:36}  {record.state.value:19}  {record.to_json()['created']:20}  {record.label}".rstrip())
    return 0


def cmd_keys_show(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    store = open_store(settings)
    try:
        record = store.get_key(parse_key_id(args.id))
    finally:
        store.close()
    show_key(args, record, key_lines(record))
    return 0


# --- create, import, rotate, activate ------------------------------------------------------------------------

def cmd_keys_create(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    # Active only if no key is and no platform registration must come first; otherwise pending activation.
    record = apply(settings, changes.create(registration=settings.genesys is not None, label=args.label or "")).record
    if settings.genesys is not None:
        # Every new key is registered; the platform then wraps with it, so it becomes the active one.
        print(f"new key {record.id}: pending activation; registering it with the platform", file=sys.stderr)
        record = genesys.register(settings, record.id)
    show_key(args, record, key_lines(record))
    if record.state is KeyState.PENDING_ACTIVATION and not args.json:
        print(f"pending activation: it serves unwraps; once the platform has it, `lkm keys activate {record.id}` "
              f"makes it the active key")
    return 0


def cmd_keys_import(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    key_id = parse_key_id(args.id)
    data = read_input(args.file)
    password = Path(args.password_file).read_bytes().rstrip(b"\r\n") if args.password_file else None
    store = open_store(settings)
    facts = ChangeFacts()
    try:
        with intended(settings, AuditAction.IMPORT_KEY, key_id) as done:
            try:
                try:
                    private_key = load_private_key_any(data, password)
                except LkmError as exc:
                    exc.message = f"{args.file}: {exc.message}"
                    raise
                # Without --state: active if no key is, else retired; a taken id must hold identical material.
                record, _ = lifecycle.import_key(store, key_id, private_key,
                                                 state=KeyState(args.state) if args.state else None,
                                                 label=args.label or "", facts=facts)
            finally:
                done.details.update(facts.audit_details())
    finally:
        store.close()
    print(key_lines(record))
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    registration = settings.genesys is not None
    applied = apply(settings, changes.rotate(registration=registration, label=args.label or ""))
    record = applied.record
    previous = applied.facts.previous_active or "(none)"
    if registration:
        print(f"new key {record.id}: pending activation; registering it with the platform "
              f"(key {previous} stays active meanwhile)", file=sys.stderr)
        record = genesys.register(settings, record.id)
    show_key(args, record, f"rotated: key {record.id} is {record.state.value}; previously active: {previous}")
    return 0


def cmd_keys_activate(args: argparse.Namespace) -> int:
    applied = apply(settings_of(args), changes.activate(parse_key_id(args.id)))
    retired = applied.facts.retired
    print(transition_line(applied) + (f" (retired: {retired})" if retired else ""))
    return 0


# --- disable, enable, destruction ----------------------------------------------------------------------------

def cmd_keys_disable(args: argparse.Namespace) -> int:
    key_id = parse_key_id(args.id)
    try:
        applied = apply(settings_of(args), changes.disable(key_id, force=args.force))
    except IllegalTransition as exc:
        if args.force:
            raise
        raise CliError(f"{exc.message} (`lkm keys rotate` first, or `lkm keys disable {key_id} --force` for the "
                       f"cut-off)") from None
    print(transition_line(applied) + "  (unwraps with this key are refused; `lkm keys enable` undoes)")
    return 0


def cmd_keys_enable(args: argparse.Namespace) -> int:
    key_id = parse_key_id(args.id)
    print(transition_line(apply(settings_of(args), changes.enable(key_id))))
    return 0


def cmd_keys_schedule_destruction(args: argparse.Namespace) -> int:
    key_id = parse_key_id(args.id)
    applied = apply(settings_of(args), changes.schedule_destruction(key_id, args.days))
    record = applied.record
    after = format_time(record.destroy_after) if record.destroy_after else "?"
    print(transition_line(applied) + f"; may be destroyed after {after} "
          f"(`lkm keys destroy {record.id}`; `lkm keys cancel-destruction {record.id}` undoes)")
    return 0


def cmd_keys_cancel_destruction(args: argparse.Namespace) -> int:
    key_id = parse_key_id(args.id)
    print(transition_line(apply(settings_of(args), changes.cancel_destruction(key_id))))
    return 0


def cmd_keys_destroy(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    key_id = parse_key_id(args.id)
    store = open_store(settings)
    try:
        report = lifecycle.destruction_report(store, key_id, audit_path=settings.audit.path)
        print(f"key {key_id} ({report.key.state.value})")
        for check in report.safeguards:
            print(f"  [{'ok' if check.ok else 'FAIL'}] {check.name}: {check.detail}")
        print(f"  last unwrap: {report.last_unwrap_text()}")
        if args.dry_run:
            audit(settings, AuditAction.DESTROY_KEY_DRY_RUN, key_id, allowed=report.allowed,
                  last_unwrap=format_time(report.last_unwrap) if report.last_unwrap else None)
            print("dry run: destruction " + ("would proceed" if report.allowed else "would be refused"))
            return 0 if report.allowed else 1
        try:
            record = apply(settings, changes.destroy(key_id), store=store).record
        except IllegalTransition as exc:
            # Judged again as it stands now: another process may have changed the key since the report above.
            store.refresh()
            current = lifecycle.destruction_report(store, key_id, audit_path=settings.audit.path)
            if current.key.state is KeyState.DESTROYED:
                raise CliError(f"destruction of {key_id} refused: {exc.message}; another process destroyed "
                               "it already") from None
            failed = [c.detail for c in current.safeguards if not c.ok]
            raise CliError(f"destruction of {key_id} refused: {'; '.join(failed) or exc.message}"
                           + ("; run again after that" if any("waiting period" in f for f in failed) else "")) \
                from None
    finally:
        store.close()
    print(f"{record.id}: destroyed (private key erased; the metadata stays so unwraps say 'destroyed')")
    return 0


# --- bulk import -----------------------------------------------------------------------------------------------

def cmd_keys_import_bulk(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    data = read_input(args.file)
    try:
        rows = migrate.read_rows(data, args.format)
    except (migrate.ExportUnreadable, UnicodeDecodeError) as exc:
        raise CliError(f"{args.file}: {exc}") from None

    intents: dict[int, Intent] = {}

    def announce(row: migrate.Row, key_id: str) -> None:
        intents[row.number] = intent = Intent(AuditAction.IMPORT_KEY, key_id)
        write_event(settings, intent.event(cli_origin()))

    def audit_row(result: migrate.RowResult, details: dict[str, Any]) -> None:
        intent = intents.pop(result.row.number, None)
        if intent is not None:
            details.update(intent.pairing())
        if result.outcome == "refused":
            audit(settings, AuditAction.IMPORT_KEY, result.key_id, outcome="error",
                  error_code=details.pop("error_code", "import_rejected"), reason=result.reason, **details)
        else:
            audit(settings, AuditAction.IMPORT_KEY, result.key_id, **details)

    wanted = parse_key_id(args.activate) if args.activate else None
    if wanted is not None and wanted not in {(r.key_id or "").strip().lower() for r in rows}:
        raise CliError(f"--activate {wanted}: no row of {args.file} holds that id; nothing was imported. "
                       f"Name an id from the file, or import without --activate and run `lkm keys rotate`")
    store = open_store(settings)
    try:
        results = migrate.import_rows(store, rows, state=KeyState(args.state), activate=args.activate,
                                      audit=audit_row, before=announce)
        activated = store.get_key(wanted) if wanted is not None and any(r.key_id == wanted for r in results) \
            else None
    finally:
        store.close()
    for result in results:
        print(result.line())
    counts = {o: sum(r.outcome == o for r in results) for o in ("imported", "unchanged", "refused")}
    print(f"{counts['imported']} imported, {counts['unchanged']} unchanged, {counts['refused']} refused")
    if wanted is not None and (activated is None or activated.state is not KeyState.ACTIVE):
        state = activated.state.value if activated else "not imported"
        raise CliError(f"--activate {wanted}: nothing was activated: the key is {state} (a key already in the "
                       f"store is left as it is). See `lkm keys list`; a key pending activation is activated with "
                       f"`lkm keys activate ID`")
    return 1 if counts["refused"] else 0


# --- parser ------------------------------------------------------------------------------------------------------

def cmd_keys_migrate(args: argparse.Namespace) -> int:
    from lkm.config import load_settings  # noqa: PLC0415
    from lkm.keycopy import copy_keys  # noqa: PLC0415

    settings = settings_of(args)
    target_settings = load_settings(args.to)
    source = open_store(settings)
    try:
        target = open_store(target_settings)
        try:
            results = copy_keys(source, target)
        finally:
            target.close()
    finally:
        source.close()
    for result in results:
        if result.outcome == "copied":  # recorded in the target's trail: that is where the key now lives
            audit(target_settings, AuditAction.MIGRATE_KEY, result.key_id, to_state=result.state,
                  source=settings.source)
        elif result.outcome == "refused":
            audit(target_settings, AuditAction.MIGRATE_KEY, result.key_id, outcome="error", error_code="key_exists",
                  reason=result.reason, source=settings.source)
        print(result.line())
    counts = {o: sum(r.outcome == o for r in results) for o in ("copied", "present", "refused", "not copied")}
    print(", ".join(f"{v} {k}" for k, v in counts.items()))
    return 1 if counts["refused"] else 0


def add_commands(sub: Any, add: AddCommand) -> None:
    keys = sub.add_parser("keys", help="manage keys").add_subparsers(dest="keys_command", required=True,
                                                                    metavar="ACTION")
    p = add("list", cmd_keys_list, "list keys", keys)
    p.add_argument("--json", action="store_true")
    p = add("show", cmd_keys_show, "show one key and its public key", keys)
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p = add("create", cmd_keys_create,
            "create an RSA-3072 key (active if none is and no registration is needed, else pending activation)",
            keys)
    p.add_argument("--label")
    p.add_argument("--json", action="store_true")
    p = add("import", cmd_keys_import,
            "import an RSA-3072 private key (PEM PKCS#1/PKCS#8, DER, or base64 DER PKCS#1) under an id", keys)
    p.add_argument("--id", required=True, help="the key id (UUID) the platform knows it by")
    p.add_argument("--label")
    p.add_argument("--state", choices=["active", "retired", "disabled", "pending_activation"],
                   help="default: active if no key is, else retired")
    p.add_argument("--password-file", help="file holding the password of an encrypted PEM")
    p.add_argument("file", help="key file, or - for standard input")
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
    p = add("migrate", cmd_keys_migrate,
            "copy every key of this store into the store of another configuration (file <-> PostgreSQL); "
            "each copy is proved by a test unwrap, and running it again is safe", keys)
    p.add_argument("--to", required=True, metavar="OTHER_CONFIG", help="configuration of the target store")
    p = add("import-bulk", cmd_keys_import_bulk,
            "import keypairs exported from the platform's sample LKM (CSV or JSON with id and private key)", keys)
    p.add_argument("file", help="the export, or - for standard input")
    p.add_argument("--format", choices=("auto", "csv", "json"), default="auto")
    p.add_argument("--state", choices=[s.value for s in (KeyState.RETIRED, KeyState.DISABLED)],
                   default=KeyState.RETIRED.value, help="state of the imported keys (default %(default)s)")
    p.add_argument("--activate", metavar="ID", help="make this imported key the active one (if none is)")
