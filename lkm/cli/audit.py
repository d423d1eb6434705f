"""`lkm audit verify`: the hash chain of the audit trail, checked offline."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lkm.cli.common import AddCommand

UNFINISHED_STATUS = 3
"""`lkm audit verify`: the chain is intact but holds intents without an outcome."""


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from lkm.audit import verify_chain_files  # noqa: PLC0415

    result = verify_chain_files(Path(args.file))
    if not result.ok:
        print(f"{args.file}: BROKEN at {result.first_bad_file} line {result.first_bad_line}"
              f" (seq {result.first_bad_seq}): {result.reason}")
        return 1
    print(f"{args.file}: OK, {result.records} records in {result.files} file(s), chain intact")
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
    p.add_argument("file")
