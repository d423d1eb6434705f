"""`lkm audit verify`: the hash chain of the audit trail, checked offline.

Only a trail that exists, holds records, starts at its genesis record (or, with --accept-pruned, at a record
whose predecessors rotation pruned) and is unbroken verifies; anything else exits 1 saying what was found.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lkm.cli.common import AddCommand, settings_of
from lkm.errors import CliError

UNFINISHED_STATUS = 3
"""`lkm audit verify`: the chain is intact but holds intents without an outcome."""


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from lkm.audit import FIRST_SEQ, verify_chain_files  # noqa: PLC0415

    path = Path(args.file) if args.file else settings_of(args).audit.path
    if path.is_dir():
        raise CliError(f"{path} is a directory; pass the trail's current file (audit.path in the config, "
                       f"e.g. {path / 'audit.log'})")
    result = verify_chain_files(path)
    if result.files == 0:
        raise CliError(f"{path}: no audit trail here (neither {path.name} nor rotated {path.name}.<time> files "
                       f"exist); check audit.path in the config")
    if not result.ok:
        print(f"{path}: BROKEN at {result.first_bad_file} line {result.first_bad_line}"
              f" (seq {result.first_bad_seq}): {result.reason}")
        return 1
    if result.records == 0:
        raise CliError(f"{path}: empty: 0 records in {result.files} file(s); nothing to verify")
    start = f"seq {result.first_seq} (hash {result.first_hash})"
    if result.anchored and not args.accept_pruned:
        print(f"{path}: NOT VERIFIED: the chain starts at {start}, not at the genesis record (seq {FIRST_SEQ}): "
              f"its first file(s) are missing. If audit.keep_files pruned them, compare that record with a "
              f"copy of the pruned file's head and run again with --accept-pruned")
        return 1
    pruned = " (older files pruned: nothing before it is vouched for)" if result.anchored else ""
    print(f"{path}: OK, {result.records} records in {result.files} file(s), chain intact from {start}{pruned} "
          f"to seq {result.last_seq} (head {result.head})")
    if not result.unfinished:
        return 0
    # The chain is whole, but a process stopped between announcing a change and recording its outcome: the
    # change may or may not have been made. Exit status 3 lets automation tell this from a broken chain.
    print(f"{len(result.unfinished)} change(s) announced without a recorded outcome (check each in the store):")
    for intent in result.unfinished:
        print(f"  {intent.line()}")
    return UNFINISHED_STATUS


def add_commands(sub: Any, add: AddCommand) -> None:
    audit = sub.add_parser("audit", help="the audit trail").add_subparsers(dest="audit_command", required=True,
                                                                         metavar="ACTION")
    p = add("verify", cmd_audit_verify, "verify the hash chain of an audit file and its rotated siblings", audit)
    p.add_argument("file", nargs="?", help="the trail's current file (default: audit.path of the config)")
    p.add_argument("--accept-pruned", action="store_true",
                   help="accept a trail whose oldest files audit.keep_files removed (the start is reported)")
