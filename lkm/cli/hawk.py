"""`lkm hawk create|list|revoke`: the Hawk credentials the platform signs its calls with."""

from __future__ import annotations

import argparse
from typing import Any

from lkm.cli.common import AddCommand, intended, print_json, settings_of
from lkm.errors import CliError


def cmd_hawk_create(args: argparse.Namespace) -> int:
    from lkm.hawk import mint_credential  # noqa: PLC0415

    settings = settings_of(args)
    path = settings.platform.hawk.credentials_file
    if path is None:
        raise CliError(f"{settings.source}: platform.hawk.credentials_file is not set; nowhere to store it")
    try:
        with intended(settings, "hawk_create", None, hawk_id=args.id):
            credential = mint_credential(path, args.id)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print_json({"id": credential.id, "key": credential.key, "algorithm": credential.algorithm})
    else:
        print("Hawk credential created. The key is shown once; register both with the platform:")
        print(f"  apiId:  {credential.id}")
        print(f"  apiKey: {credential.key}")
    return 0


def cmd_hawk_list(args: argparse.Namespace) -> int:
    from lkm.hawk import load_credentials_file  # noqa: PLC0415

    settings = settings_of(args)
    path = settings.platform.hawk.credentials_file
    creds = load_credentials_file(path) if path else {}
    for cred_id in sorted(creds):
        print(cred_id)
    for ref in settings.platform.hawk.credentials:
        print(f"{ref.id} (from config)")
    return 0


def cmd_hawk_revoke(args: argparse.Namespace) -> int:
    from lkm.hawk import load_credentials_file, revoke_credential  # noqa: PLC0415

    settings = settings_of(args)
    path = settings.platform.hawk.credentials_file
    if path is None or args.id not in load_credentials_file(path):
        raise CliError(f"no Hawk credential {args.id!r} in the credentials file")
    with intended(settings, "hawk_revoke", None, hawk_id=args.id):
        if not revoke_credential(path, args.id):
            raise CliError(f"no Hawk credential {args.id!r} in the credentials file")
    print(f"revoked {args.id}")
    return 0


def add_commands(sub: Any, add: AddCommand) -> None:
    hawk = sub.add_parser("hawk", help="Hawk credentials for the platform").add_subparsers(
        dest="hawk_command", required=True, metavar="ACTION")
    p = add("create", cmd_hawk_create, "mint a Hawk credential (prints the key once)", hawk)
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    add("list", cmd_hawk_list, "list Hawk credential ids", hawk)
    p = add("revoke", cmd_hawk_revoke, "revoke a Hawk credential", hawk)
    p.add_argument("id")
