"""`lkm hawk create|list|revoke`: the Hawk credentials the platform signs its calls with."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

from lkm.audit.record import AuditAction
from lkm.cli.common import AddCommand, cluster_store, intended, print_json, settings_of
from lkm.config import Settings
from lkm.errors import CliError


@contextlib.contextmanager
def shared_credentials(settings: Settings) -> Iterator[Any]:
    """The database's credentials (lkm.keystore.postgresql.hawk.ClusterHawk) when the key store is PostgreSQL,
    so every replica sees them; None for a file store (the credentials file is used)."""
    with cluster_store(settings) as store:
        if store is None:
            yield None
            return
        from lkm.keystore.postgresql.hawk import ClusterHawk  # noqa: PLC0415 - optional extra, loaded on demand

        yield ClusterHawk.of(store, window_seconds=settings.platform.hawk.timestamp_skew_seconds)


def cmd_hawk_create(args: argparse.Namespace) -> int:
    from lkm.hawk_credentials import mint_credential  # noqa: PLC0415

    settings = settings_of(args)
    path = settings.platform.hawk.credentials_file
    with shared_credentials(settings) as shared:
        if shared is None and path is None:
            raise CliError(f"{settings.source}: platform.hawk.credentials_file is not set; nowhere to store it")
        try:
            with intended(settings, AuditAction.HAWK_CREATE, None, hawk_id=args.id):
                if shared is not None:
                    credential = shared.create(args.id)
                else:
                    assert path is not None
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
    from lkm.hawk_credentials import load_credentials_file  # noqa: PLC0415

    settings = settings_of(args)
    path = settings.platform.hawk.credentials_file
    with shared_credentials(settings) as shared:
        for info in shared.list() if shared is not None else ():
            print(f"{info.id} (database, created {info.created:%Y-%m-%dT%H:%M:%SZ})")
    creds = load_credentials_file(path) if path else {}
    for cred_id in sorted(creds):
        print(cred_id)
    for ref in settings.platform.hawk.credentials:
        print(f"{ref.id} (from config)")
    return 0


def cmd_hawk_revoke(args: argparse.Namespace) -> int:
    from lkm.hawk_credentials import load_credentials_file, revoke_credential  # noqa: PLC0415

    settings = settings_of(args)
    path = settings.platform.hawk.credentials_file
    with shared_credentials(settings) as shared:
        in_database = shared is not None and any(info.id == args.id for info in shared.list())
        if not in_database and (path is None or args.id not in load_credentials_file(path)):
            raise CliError(f"no Hawk credential {args.id!r} in the key store's database or the credentials file")
        with intended(settings, AuditAction.HAWK_REVOKE, None, hawk_id=args.id):
            revoked = shared.revoke(args.id) if in_database and shared is not None \
                else path is not None and revoke_credential(path, args.id)
            if not revoked:
                raise CliError(f"no Hawk credential {args.id!r} to revoke")
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
