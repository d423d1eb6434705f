"""`lkm freeze ID | --list` and `lkm unfreeze ID`: stop (or slow) one caller on every process of the server."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
from collections.abc import Iterator
from typing import Any

from lkm.audit.record import AuditAction
from lkm.callerguard import frozen_list
from lkm.cli.common import AddCommand, cluster_store, intended, print_json, settings_of
from lkm.config import Settings
from lkm.errors import CliError
from lkm.freeze import FreezeMode, FrozenList, new_entry


@contextlib.contextmanager
def opened_list(settings: Settings) -> Iterator[FrozenList]:
    """The list every server of this configuration reads: the PostgreSQL store's table, else the file."""
    with cluster_store(settings) as store:
        yield frozen_list(settings, store)


def cmd_freeze(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    with opened_list(settings) as frozen:
        return freeze(args, settings, frozen)


def freeze(args: argparse.Namespace, settings: Settings, frozen: FrozenList) -> int:
    if args.list:
        entries = [e.to_json() for _, e in sorted(frozen.read().items())]
        if args.json:
            print_json(entries)
        for e in [] if args.json else entries:
            when = dt.datetime.fromtimestamp(float(str(e["at"])), dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            print(f"{e['id']}\t{e['mode']}\tby {e['by']} at {when}\t{e['reason']}")
        return 0
    if not args.id:
        raise CliError("name the caller to freeze (a Hawk id or a client name), or --list", status=2)
    mode = FreezeMode(args.mode)
    with intended(settings, AuditAction.FREEZE_CALLER, None, caller=args.id, mode=mode.value, by="operator"):
        changed = frozen.put(new_entry(args.id, mode, "operator", args.reason or ""))
    print(f"{'froze' if changed else 'already frozen:'} {args.id} ({mode.value}); every server process "
          f"applies it within limits.refresh_seconds")
    return 0


def cmd_unfreeze(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    with opened_list(settings) as frozen, intended(settings, AuditAction.UNFREEZE_CALLER, None, caller=args.id):
        if not frozen.remove(args.id):
            raise CliError(f"{args.id} is not frozen")
    print(f"unfroze {args.id}")
    return 0


def add_commands(sub: Any, add: AddCommand) -> None:
    p = add("freeze", cmd_freeze, "stop (or slow) a caller on every server process until `lkm unfreeze`", sub)
    p.add_argument("id", nargs="?", help="a Hawk id or a client name (native.clients[].name)")
    p.add_argument("--mode", choices=[m.value for m in FreezeMode], default=FreezeMode.STOP.value)
    p.add_argument("--reason", help="recorded with the entry")
    p.add_argument("--list", action="store_true", help="list the frozen callers")
    p.add_argument("--json", action="store_true")
    p = add("unfreeze", cmd_unfreeze, "let a frozen caller in again", sub)
    p.add_argument("id")
