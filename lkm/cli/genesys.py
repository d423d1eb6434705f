"""`lkm genesys register`, and the registration that `keys create` and `keys rotate` run when genesys is set."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from typing import Any

from lkm.audit.record import AuditAction
from lkm.changes import KeyChange
from lkm.cli.common import AddCommand, apply, audit, open_store, settings_of
from lkm.config import Settings
from lkm.errors import CliError
from lkm.keys import KeyRecord, parse_key_id


def cmd_genesys_register(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    record = register(settings, parse_key_id(args.id))
    print(f"key {record.id} is {record.state.value}")
    return 0


def register(settings: Settings, key_id: str) -> KeyRecord:
    """Registers with the platform (retrying as configured) and activates; CliError when it stays pending."""
    from lkm import registration  # noqa: PLC0415 - pulls in aiohttp; only registering needs it

    if settings.genesys is None:
        raise CliError(f"{settings.source}: no genesys section; register the public key with the platform by "
                       f"hand, then run `lkm keys activate {key_id}`")
    owner = f"cli:{socket.gethostname()}:{os.getpid()}"

    async def inline(func: Any, *args: Any) -> Any:
        return func(*args)  # the command line has nothing else to do meanwhile

    async def attempted(attempt: registration.Attempt) -> None:
        if attempt.error is None:
            print(f"  attempt {attempt.number}: registered", file=sys.stderr)
            audit(settings, AuditAction.REGISTER_KEY, key_id, **attempt.audit_details())
            return
        print(f"  attempt {attempt.number}: {attempt.error}" + (" (retrying)" if attempt.retrying else ""),
              file=sys.stderr)
        audit(settings, AuditAction.REGISTER_KEY, key_id, outcome="error", error_code=attempt.error.code,
              **attempt.audit_details())

    async def activate(change: KeyChange) -> KeyRecord:
        return apply(settings, change, store=store).record

    store = open_store(settings)
    try:
        outcome = asyncio.run(registration.register(store, settings.genesys, key_id, owner, run=inline,
                                                    on_attempt=attempted, apply=activate))
    finally:
        store.close()
    if outcome.holder is not None:
        raise CliError(f"key {key_id} is being registered by {outcome.holder}; wait for it "
                       f"(`lkm keys show {key_id}`)")
    if outcome.activated is None:
        state = outcome.state.value if outcome.state else "?"
        raise CliError(f"registration failed: {outcome.error}. Key {key_id} stays {state}; key {outcome.active} "
                       f"stays active. Retry with `lkm genesys register {key_id}`")
    return outcome.activated


def add_commands(sub: Any, add: AddCommand) -> None:
    gen = sub.add_parser("genesys", help="the platform API").add_subparsers(
        dest="genesys_command", required=True, metavar="ACTION")
    p = add("register", cmd_genesys_register,
            "register a key's public half with the platform and activate it", gen)
    p.add_argument("id")
