"""The parser of every command, and the exit statuses: 0 done, 1 refused or failed, 2 usage or configuration."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lkm import __version__
from lkm.cli import audit, backup, callers, completion, genesys, hawk, keys, serve
from lkm.errors import CliError, ConfigError, KeyStoreError, LkmError

CONFIG_HELP = "YAML config file (default: $LKM_CONFIG)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lkm", description="Local Key Manager")
    parser.add_argument("--version", action="version", version=f"lkm {__version__}")
    # -c works before the command (`lkm -c FILE keys list`) and after it; after wins. SUPPRESS keeps a
    # command's parser from overwriting the global value with its default.
    parser.add_argument("-c", "--config", help=CONFIG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_parent = argparse.ArgumentParser(add_help=False)
    config_parent.add_argument("-c", "--config", default=argparse.SUPPRESS, help=CONFIG_HELP)

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
    callers.add_commands(sub, add)
    audit.add_commands(sub, add)
    serve.add_tools(sub, add)
    completion.add_commands(sub, add, parser)
    return parser


def _fail(message: str, status: int) -> int:
    """One line on standard error: the operator reads what failed, never a traceback."""
    print("lkm: " + " ".join(message.split()), file=sys.stderr)
    return status


def os_error_text(exc: OSError) -> str:
    """`FILE: reason` for a file, the library's own text (host and port) for a connection."""
    if exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    host, port = getattr(exc, "host", None), getattr(exc, "port", None)  # aiohttp's connection errors
    if host is not None and port is not None:
        return f"cannot connect to {host}:{port}: {exc.strerror or 'connection failed'}; is the server running?"
    return str(exc) or exc.__class__.__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        return _fail(f"configuration error: {exc}", 2)
    except CliError as exc:
        return _fail(str(exc), exc.status)
    except KeyStoreError as exc:
        return _fail(f"key store: {exc}", 1)
    except LkmError as exc:
        return _fail(f"{exc.code}: {exc.message}", 1)
    except OSError as exc:  # a file that is missing or unwritable, a server that does not answer
        return _fail(os_error_text(exc), 1)
    except KeyboardInterrupt:
        return 130
