"""The command line: every operation an operator needs, on the same key store the server uses."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lkm import __version__
from lkm.config import Settings, load_settings
from lkm.errors import ConfigError, KeyStoreError, LkmError
from lkm.keys import KeyRecord, KeyState, load_private_key_any, parse_key_id, public_key_views
from lkm.keystore import KeyStore

DEFAULT_DEV_DIR = "lkm-dev"


class CliError(Exception):
    """A failure already phrased for the operator; exit status 1 (2 for usage and config)."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


# --- shared helpers ----------------------------------------------------------------------------------------

def _config_path(args: argparse.Namespace) -> str:
    path = getattr(args, "config", None) or os.environ.get("LKM_CONFIG")
    if not path:
        raise CliError("no configuration: pass -c FILE or set LKM_CONFIG", status=2)
    return str(path)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(_config_path(args))


def _open_store(settings: Settings) -> KeyStore:
    from lkm.keystore.open import open_keystore  # noqa: PLC0415 - keeps `lkm --help` fast

    return open_keystore(settings.keystore)


def _audit_cli(settings: Settings, action: str, key_id: str | None, outcome: str = "ok",
               **extra: Any) -> None:
    from lkm.audit import AuditLog, local_actor  # noqa: PLC0415

    event: dict[str, Any] = {"request_id": None, "actor": local_actor(), "action": action, "key_id": key_id,
                             "outcome": outcome, "route": "cli"}
    event.update(extra)
    settings.audit.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    AuditLog(settings.audit.path, max_bytes=settings.audit.max_bytes,
             keep_files=settings.audit.keep_files).record_sync(event)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=False))


def _key_lines(record: KeyRecord) -> str:
    views = public_key_views(record)
    return "\n".join([
        f"id:        {record.id}",
        f"state:     {record.state.value}",
        f"created:   {record.to_json()['created']}",
        f"backend:   {record.backend}",
        *([f"label:     {record.label}"] if record.label else []),
        "public key (platform format, base64 DER PKCS#1):",
        views["public_key_pkcs1_b64"],
        "public key (PEM SubjectPublicKeyInfo):",
        views["public_key_pem"].rstrip(),
    ])


# --- commands ----------------------------------------------------------------------------------------------

def cmd_serve(args: argparse.Namespace) -> int:
    from lkm import devmode  # noqa: PLC0415
    from lkm.logs import setup_logging  # noqa: PLC0415
    from lkm.server import LkmServer, serve_forever  # noqa: PLC0415

    if args.dev:
        pkcs11 = None
        if args.keystore == "pkcs11":
            pkcs11 = _dev_pkcs11(Path(args.dev_dir))
        config_path = devmode.ensure_dev_environment(Path(args.dev_dir), port_base=args.dev_port_base,
                                                     keystore=args.keystore, pkcs11=pkcs11)
    else:
        config_path = Path(_config_path(args))
    settings = load_settings(config_path)
    log_writer = setup_logging(settings.logging.level, settings.logging.format)

    def started(server: LkmServer) -> None:
        if args.dev:
            active = [k.id for k in server.store.list_keys() if k.state is KeyState.ACTIVE] \
                if server.store else []
            urls = {name: server.url(name) for name in server.listeners}
            dev_json = devmode.write_dev_json(settings, urls, active[-1] if active else None)
            print(devmode.usage_text(dev_json), flush=True)
        else:
            print("lkm serving: " + ", ".join(f"{n} {server.url(n)}" for n in server.listeners), flush=True)

    try:
        asyncio.run(serve_forever(settings, on_started=started))
    finally:
        log_writer.stop()  # writes out what is queued
    return 0


def _dev_pkcs11(dev_dir: Path) -> dict[str, Any]:
    """Makes (once) a private SoftHSM2 token for the dev mode and returns its keystore settings."""
    import subprocess  # noqa: PLC0415

    token_dir = dev_dir.resolve() / "softhsm"
    script = Path(__file__).resolve().parent.parent / "softhsm" / "make-token.sh"
    settings_file = token_dir / "lkm-keystore.json"
    if not settings_file.exists():
        if not script.exists():
            raise CliError(f"the SoftHSM helper script {script} is missing (run from a source checkout)")
        subprocess.run(["bash", str(script), "--dir", str(token_dir), "--json", str(settings_file)],
                       check=True)
    data: dict[str, Any] = json.loads(settings_file.read_text())
    data["module_env"] = {"SOFTHSM2_CONF": data.pop("softhsm2_conf")}
    return data


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from lkm.tlsconf import server_context  # noqa: PLC0415

    if settings.platform.tls:
        server_context(settings.platform.tls, require_client_cert=False, source=settings.source,
                       setting="platform.tls")
    if settings.native:
        server_context(settings.native.tls, require_client_cert=True, source=settings.source,
                       setting="native.tls")
    if settings.keystore.passphrase:
        settings.keystore.passphrase.read_bytes()
    if settings.keystore.pin:
        settings.keystore.pin.read_bytes()
    for ref in settings.platform.hawk.credentials:
        ref.key.read_bytes()
    print(f"{settings.source}: configuration is valid")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    settings = _settings(args)
    store = _open_store(settings)
    try:
        records = store.list_keys()
    finally:
        store.close()
    if args.json:
        _print_json([{**r.to_json(), "public_key_pkcs1_b64": public_key_views(r)["public_key_pkcs1_b64"]}
                     for r in records])
        return 0
    print(f"{'ID':36}  {'STATE':19}  CREATED")
    for record in records:
        print(f"{record.id:36}  {record.state.value:19}  {record.to_json()['created']}")
    return 0


def cmd_keys_show(args: argparse.Namespace) -> int:
    settings = _settings(args)
    store = _open_store(settings)
    try:
        record = store.get_key(parse_key_id(args.id))
    finally:
        store.close()
    if args.json:
        _print_json({**record.to_json(), **public_key_views(record)})
    else:
        print(_key_lines(record))
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    from lkm import lifecycle  # noqa: PLC0415
    from lkm.cli_lifecycle import _change, _register  # noqa: PLC0415

    settings = _settings(args)
    # Active only if no key is and no platform registration must come first; otherwise pending activation.
    record, _ = _change(settings, "create_key", None, lifecycle.create_key,
                        registration=settings.genesys is not None, label=args.label or "")
    if settings.genesys is not None:
        # Every new key is registered; the platform then wraps with it, so it becomes the active one.
        print(f"new key {record.id}: pending activation; registering it with the platform", file=sys.stderr)
        record = _register(settings, record.id)
    if args.json:
        _print_json({**record.to_json(), **public_key_views(record)})
        return 0
    print(_key_lines(record))
    if record.state is KeyState.PENDING_ACTIVATION:
        print(f"pending activation: it serves unwraps; once the platform has it, `lkm keys activate {record.id}` "
              f"makes it the active key")
    return 0


def cmd_keys_import(args: argparse.Namespace) -> int:
    settings = _settings(args)
    key_id = parse_key_id(args.id)
    data = Path(args.file).read_bytes() if args.file != "-" else sys.stdin.buffer.read()
    password = Path(args.password_file).read_bytes().rstrip(b"\r\n") if args.password_file else None
    from lkm import lifecycle  # noqa: PLC0415

    store = _open_store(settings)
    details: dict[str, Any] = {}
    try:
        private_key = load_private_key_any(data, password)
        # Without --state: active if no key is, else retired; an id that is taken must hold identical material.
        record, _ = lifecycle.import_key(store, key_id, private_key,
                                         state=KeyState(args.state) if args.state else None,
                                         label=args.label or "", details=details)
    except LkmError as exc:
        _audit_cli(settings, "import_key", key_id, outcome="error", error_code=exc.code, **details)
        raise
    finally:
        store.close()
    _audit_cli(settings, "import_key", record.id, **details)
    print(_key_lines(record))
    return 0


def cmd_hawk_create(args: argparse.Namespace) -> int:
    from lkm.hawk import mint_credential  # noqa: PLC0415

    settings = _settings(args)
    path = settings.platform.hawk.credentials_file
    if path is None:
        raise CliError(f"{settings.source}: platform.hawk.credentials_file is not set; nowhere to store it")
    try:
        credential = mint_credential(path, args.id)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    _audit_cli(settings, "hawk_create", None, hawk_id=credential.id)
    if args.json:
        _print_json({"id": credential.id, "key": credential.key, "algorithm": credential.algorithm})
    else:
        print("Hawk credential created. The key is shown once; register both with the platform:")
        print(f"  apiId:  {credential.id}")
        print(f"  apiKey: {credential.key}")
    return 0


def cmd_hawk_list(args: argparse.Namespace) -> int:
    from lkm.hawk import load_credentials_file  # noqa: PLC0415

    settings = _settings(args)
    path = settings.platform.hawk.credentials_file
    creds = load_credentials_file(path) if path else {}
    for cred_id in sorted(creds):
        print(cred_id)
    for ref in settings.platform.hawk.credentials:
        print(f"{ref.id} (from config)")
    return 0


def cmd_hawk_revoke(args: argparse.Namespace) -> int:
    from lkm.hawk import revoke_credential  # noqa: PLC0415

    settings = _settings(args)
    path = settings.platform.hawk.credentials_file
    if path is None or not revoke_credential(path, args.id):
        raise CliError(f"no Hawk credential {args.id!r} in the credentials file")
    _audit_cli(settings, "hawk_revoke", None, hawk_id=args.id)
    print(f"revoked {args.id}")
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from lkm.audit import verify_chain_files  # noqa: PLC0415

    result = verify_chain_files(Path(args.file))
    if result.ok:
        print(f"{args.file}: OK, {result.records} records in {result.files} file(s), chain intact")
        return 0
    print(f"{args.file}: BROKEN at {result.first_bad_file} line {result.first_bad_line}"
          f" (seq {result.first_bad_seq}): {result.reason}")
    return 1


def cmd_bench(args: argparse.Namespace) -> int:
    from lkm.bench.command import run  # noqa: PLC0415

    return run(args)


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    from lkm.bench.options import add_arguments  # noqa: PLC0415

    add_arguments(parser)


def cmd_demo(args: argparse.Namespace) -> int:
    from lkm.demo import run_demo  # noqa: PLC0415

    return asyncio.run(run_demo(Path(args.dev_json) if args.dev_json else None, args.config))


# --- parser ------------------------------------------------------------------------------------------------

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

    serve = add("serve", cmd_serve, "run the server")
    serve.add_argument("--dev", action="store_true",
                       help="embedded default: make (once) and use a dev CA, certificates, key and config")
    serve.add_argument("--dev-dir", default=DEFAULT_DEV_DIR, help="data directory for --dev (default: %(default)s)")
    serve.add_argument("--dev-port-base", type=int, default=8443,
                       help="--dev listeners use this port and the next two (0: any free ports)")
    serve.add_argument("--keystore", choices=("file", "pkcs11"), default="file",
                       help="key store for a new --dev environment (pkcs11: a private SoftHSM2 token)")

    add("check-config", cmd_check_config, "validate a config file without serving")

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

    from lkm.cli_lifecycle import add_commands  # noqa: PLC0415 - it imports this module

    add_commands(sub, keys, add)

    hawk = sub.add_parser("hawk", help="Hawk credentials for the platform").add_subparsers(
        dest="hawk_command", required=True, metavar="ACTION")
    p = add("create", cmd_hawk_create, "mint a Hawk credential (prints the key once)", hawk)
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    add("list", cmd_hawk_list, "list Hawk credential ids", hawk)
    p = add("revoke", cmd_hawk_revoke, "revoke a Hawk credential", hawk)
    p.add_argument("id")

    audit = sub.add_parser("audit", help="the audit trail").add_subparsers(dest="audit_command", required=True,
                                                                         metavar="ACTION")
    p = add("verify", cmd_audit_verify, "verify the hash chain of an audit file and its rotated siblings", audit)
    p.add_argument("file")

    p = add("demo", cmd_demo, "play the platform once against a running server (wrap, unwrap, decrypt)")
    p.add_argument("--dev-json", help=f"dev.json of a --dev server (default: {DEFAULT_DEV_DIR}/dev.json)")
    p = add("bench", cmd_bench, "measure throughput and latency: a load generator, the raw key-store rate, "
                                "start-up with many keys")
    _bench_arguments(p)
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
