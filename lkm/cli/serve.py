"""`lkm serve` (with --dev, the embedded default), `check-config`, `demo` and `bench`: running things."""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
from pathlib import Path
from typing import Any

from lkm.cli import check
from lkm.cli.common import DEFAULT_DEV_DIR, AddCommand, config_path, configured_path
from lkm.config import load_settings
from lkm.errors import CliError
from lkm.idleloop import IdleAwareLoop


def cmd_serve(args: argparse.Namespace) -> int:
    from lkm import devmode  # noqa: PLC0415
    from lkm.lifecycle import newest_active_id  # noqa: PLC0415
    from lkm.logs import setup_logging  # noqa: PLC0415
    from lkm.sdnotify import Notifier  # noqa: PLC0415
    from lkm.server import LkmServer  # noqa: PLC0415
    from lkm.serving import serve_forever  # noqa: PLC0415
    from lkm.supervisor import Supervisor  # noqa: PLC0415

    notifier = Notifier.from_environ()  # only this process talks to systemd; workers do not inherit it
    if args.dev:
        pkcs11 = None
        if args.keystore == "pkcs11":
            pkcs11 = _dev_pkcs11(Path(args.dev_dir))
        path = devmode.ensure_dev_environment(Path(args.dev_dir), port_base=args.dev_port_base,
                                                     keystore=args.keystore, pkcs11=pkcs11)
    else:
        path = Path(config_path(args))
    settings = load_settings(path)
    check.read_secrets(settings)  # here, once: an unreadable secret is one line, not one per worker process
    log_writer = setup_logging(settings.logging.level, settings.logging.format)

    def serving(urls: dict[str, str], active_key: str | None) -> None:
        if args.dev:
            dev_json = devmode.write_dev_json(settings, urls, active_key)
            print(devmode.usage_text(dev_json, running_program()), flush=True)
        else:
            print("lkm serving: " + ", ".join(f"{n} {url}" for n, url in urls.items()), flush=True)

    def started(server: LkmServer) -> None:
        serving({name: server.url(name) for name in server.listeners},
                newest_active_id(server.store) if server.store else None)

    try:
        if settings.limits.workers > 1:
            supervisor = Supervisor(settings, Path(path), notifier, serving)
            asyncio.run(supervisor.run())
            if supervisor.failed:
                return 1
        else:
            with asyncio.Runner(loop_factory=IdleAwareLoop) as runner:
                runner.run(serve_forever(settings, on_started=started, config_path=Path(path), notifier=notifier))
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        fix = ("pass --dev-port-base N for other ports (0: any free ports)" if args.dev
               else f"change listen.port in {settings.source}")
        raise CliError(f"cannot listen: {exc.strerror or exc}; stop what holds the port or {fix}") from None
    finally:
        log_writer.stop()  # writes out what is queued
    return 0


def running_program() -> str:
    """The full path of the lkm that runs (`python -m lkm` spelled out), for examples that work without a venv."""
    import shlex  # noqa: PLC0415
    import sys  # noqa: PLC0415

    argv0 = Path(sys.argv[0]).resolve()
    if argv0.name == "__main__.py":
        return f"{shlex.quote(sys.executable)} -m lkm"
    return shlex.quote(str(argv0))


def _dev_pkcs11(dev_dir: Path) -> dict[str, Any]:
    """Makes (once) a private SoftHSM2 token for the dev mode and returns its keystore settings."""
    import subprocess  # noqa: PLC0415

    token_dir = dev_dir.resolve() / "softhsm"
    script = Path(__file__).resolve().parents[2] / "softhsm" / "make-token.sh"
    settings_file = token_dir / "lkm-keystore.json"
    if not settings_file.exists():
        if not script.exists():
            raise CliError(f"the SoftHSM helper script {script} is missing (run from a source checkout)")
        subprocess.run(["bash", str(script), "--dir", str(token_dir), "--json", str(settings_file)],
                       check=True)
    data: dict[str, Any] = json.loads(settings_file.read_text())
    data["module_env"] = {"SOFTHSM2_CONF": data.pop("softhsm2_conf")}
    return data


def cmd_bench(args: argparse.Namespace) -> int:
    from lkm.bench.command import run  # noqa: PLC0415

    return run(args)


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from lkm.bench.options import add_arguments  # noqa: PLC0415

    add_arguments(parser)


def cmd_demo(args: argparse.Namespace) -> int:
    from lkm.demo import dev_json_path, run_demo  # noqa: PLC0415

    config = configured_path(args)
    return asyncio.run(run_demo(dev_json_path(Path(args.dev_json) if args.dev_json else None, config,
                                              Path(args.dev_dir))))


def add_commands(sub: Any, add: AddCommand) -> None:
    """serve and check-config, first in the help."""
    serve = add("serve", cmd_serve, "run the server")
    serve.add_argument("--dev", action="store_true",
                       help="embedded default: make (once) and use a dev CA, certificates, key and config")
    serve.add_argument("--dev-dir", default=DEFAULT_DEV_DIR, help="data directory for --dev (default: %(default)s)")
    serve.add_argument("--dev-port-base", type=int, default=8443,
                       help="--dev listeners use this port and the next two (0: any free ports)")
    serve.add_argument("--keystore", choices=("file", "pkcs11"), default="file",
                       help="key store for a new --dev environment (pkcs11: a private SoftHSM2 token)")

    check.add_arguments(add("check-config", check.cmd_check_config,
                            "validate a config file and open the key store with its secrets, without serving"))


def add_tools(sub: Any, add: AddCommand) -> None:
    """demo and bench, last in the help."""
    p = add("demo", cmd_demo, "play the platform once against a running server (wrap, unwrap, decrypt)")
    p.add_argument("--dev-json", help="dev.json of a --dev server (default: beside -c's config, else in --dev-dir)")
    p.add_argument("--dev-dir", default=DEFAULT_DEV_DIR, help="data directory of the --dev server "
                                                             "(default: %(default)s)")
    p = add("bench", cmd_bench, "measure throughput and latency: a load generator, the raw key-store rate, "
                                "start-up with many keys")
    _bench_arguments(p)
