"""The parser of every command, and the exit statuses: 0 done, 1 refused or failed, 2 usage or configuration."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lkm import __version__
from lkm.cli import audit, backup, genesys, hawk, keys, serve
from lkm.errors import CliError, ConfigError, KeyStoreError, LkmError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lkm", description="Local Key Manager")
    parser.add_argument("--version", action="version", version=f"lkm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_parent = argparse.ArgumentParser(add_help=False)
    config_parent.add_argument("-c", "--config", help="YAML config file (default: $LKM_CONFIG)")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str,
            parent: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, parents=[config_parent], help=help_text,
                                                       description=help_text)
        p.set_defaults(func=func)
        return p

    # The order of the help: running, keys, the platform, backups, credentials, the audit trail, tools.
    serve.add_commands(sub, add)
    keys.add_commands(sub, add)
    genesys.add_commands(sub, add)
    backup.add_commands(sub, add)
    hawk.add_commands(sub, add)
    audit.add_commands(sub, add)
    serve.add_tools(sub, add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        print(f"lkm: configuration error: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"lkm: {exc}", file=sys.stderr)
        return exc.status
    except KeyStoreError as exc:
        print(f"lkm: key store: {exc}", file=sys.stderr)
        return 1
    except LkmError as exc:
        print(f"lkm: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
