"""The embedded default: everything a first run needs, made once in a data directory.

`lkm serve --dev` creates a local CA, a server certificate, one client certificate per role, a key-store
passphrase, a Hawk credential, a config file and a first key, then serves with them. `dev.json` in the same
directory repeats the facts for scripts. None of this is for production: the CA key sits beside the config.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from pathlib import Path
from typing import Any

import yaml

from lkm import fsutil, hawk_credentials, pki
from lkm.audit import AuditLog, local_actor
from lkm.audit.record import AuditAction
from lkm.config import Settings, load_settings
from lkm.events import audit_event
from lkm.keys import KeyState
from lkm.keystore.open import open_keystore

CONFIG_NAME = "lkm.yaml"
DEV_JSON = "dev.json"
HAWK_ID = "dev-platform"
CLIENT_ROLES: dict[str, list[str]] = {
    "admin": ["read", "unwrap", "admin"],
    "unwrapper": ["read", "unwrap"],
    "reader": ["read"],
}


def ensure_dev_environment(data_dir: Path, *, port_base: int = 8443, keystore: str = "file",
                           pkcs11: dict[str, Any] | None = None) -> Path:
    """Returns the config path, creating the whole environment on the first call."""
    data_dir = data_dir.resolve()
    config_path = data_dir / CONFIG_NAME
    if config_path.exists():
        return config_path
    fsutil.ensure_private_dir(data_dir)
    fsutil.ensure_private_dir(data_dir / "certs")

    ca = pki.make_ca()
    ca.write(data_dir / "certs" / "ca.pem", data_dir / "certs" / "ca-key.pem")
    names = ("localhost", socket.gethostname())
    server = pki.issue(ca, "localhost", server=True, dns=tuple(dict.fromkeys(names)), ips=("127.0.0.1",))
    # Only 127.0.0.1: the dev listeners bind IPv4 loopback alone, so the certificate names no other address.
    server.write(data_dir / "certs" / "server.pem", data_dir / "certs" / "server-key.pem")
    for role in CLIENT_ROLES:
        client = pki.issue(ca, f"lkm-dev-{role}", server=False)
        client.write(data_dir / "certs" / f"{role}.pem", data_dir / "certs" / f"{role}-key.pem")

    passphrase_file = data_dir / "keystore.pass"
    fsutil.atomic_write(passphrase_file, secrets.token_urlsafe(32).encode())
    hawk_credentials.mint_credential(data_dir / "hawk.json", HAWK_ID)

    def port(offset: int) -> int:
        return 0 if port_base == 0 else port_base + offset

    if keystore == "pkcs11":
        keystore_section: dict[str, Any] = {"type": "pkcs11", **(pkcs11 or {})}
    else:
        keystore_section = {"type": "file", "path": "keystore", "passphrase": {"file": "keystore.pass"}}
    config = {
        "keystore": keystore_section,
        "platform": {
            "listen": {"host": "127.0.0.1", "port": port(0)},
            "tls": {"cert_file": "certs/server.pem", "key_file": "certs/server-key.pem"},
            "path": "/key-management/v1/decrypt",
            "hawk": {"credentials_file": "hawk.json"},
        },
        "native": {
            "listen": {"host": "127.0.0.1", "port": port(1)},
            "tls": {"cert_file": "certs/server.pem", "key_file": "certs/server-key.pem",
                    "client_ca_file": "certs/ca.pem"},
            "clients": [{"name": f"dev-{role}", "subject": f"CN=lkm-dev-{role},O=lkm", "roles": roles}
                        for role, roles in CLIENT_ROLES.items()],
        },
        "ops": {"listen": {"host": "127.0.0.1", "port": port(2)}},
        "audit": {"path": "audit.log"},
        "logging": {"level": "info", "format": "text"},
    }
    header = "# Written by `lkm serve --dev`: a development set-up. See config/lkm.example.yaml.\n"
    settings_text = header + yaml.safe_dump(config, sort_keys=False)
    tmp_config = data_dir / f".{CONFIG_NAME}.new"
    fsutil.atomic_write(tmp_config, settings_text.encode())
    settings = load_settings(tmp_config)
    store = open_keystore(settings.keystore)
    try:
        if not any(k.state is KeyState.ACTIVE for k in store.list_keys()):
            record = store.create_key(state=KeyState.ACTIVE, label="first key")
            _audit_first_key(settings, record.id)
    finally:
        store.close()
    # The config appears last: its presence means the environment is complete.
    tmp_config.rename(config_path)
    fsutil.fsync_dir(data_dir)
    return config_path


def _audit_first_key(settings: Settings, key_id: str) -> None:
    """The first key is audited like any other: the trail starts with its creation."""
    origin = {"request_id": None, "actor": local_actor(), "route": "dev"}
    event = audit_event(origin, AuditAction.CREATE_KEY, key_id, outcome="ok", extra={"to_state": KeyState.ACTIVE.value,
                                                             "label": "first key"})
    AuditLog.from_settings(settings.audit).record_sync(event)


def write_dev_json(settings: Settings, urls: dict[str, str], active_key: str | None) -> Path:
    data_dir = Path(settings.source).resolve().parent
    creds = hawk_credentials.load_credentials_file(data_dir / "hawk.json")
    cred = creds.get(HAWK_ID)
    facts = {
        "config": str(Path(settings.source).resolve()),
        "data_dir": str(data_dir),
        "ca_file": str(data_dir / "certs" / "ca.pem"),
        "listeners": {
            "platform": {"url": urls.get("platform"), "decrypt_url": urls.get("platform", "")
                         + settings.platform.path},
            "native": {"url": urls.get("native")},
            "ops": {"url": urls.get("ops")},
        },
        "clients": {role: {"cert": str(data_dir / "certs" / f"{role}.pem"),
                           "key": str(data_dir / "certs" / f"{role}-key.pem"), "roles": roles}
                    for role, roles in CLIENT_ROLES.items()},
        "hawk": {"id": cred.id if cred else None, "key": cred.key if cred else None},
        "active_key": active_key,
        "pid": os.getpid(),  # lets `lkm bench` report the server's CPU time per request
    }
    path = data_dir / DEV_JSON
    fsutil.atomic_write(path, (json.dumps(facts, indent=2) + "\n").encode())
    return path


def usage_text(dev_json: Path, program: str = "lkm") -> str:
    """What to try next; `program` is the full path of the running lkm, so it works without an active venv."""
    facts = json.loads(dev_json.read_text())
    admin = facts["clients"]["admin"]
    native = facts["listeners"]["native"]["url"]
    decrypt = facts["listeners"]["platform"]["decrypt_url"]
    key = facts["active_key"]
    cfg = facts["config"]
    return f"""
lkm dev server is up.  Facts for scripts: {dev_json}

  platform route (Hawk):  {decrypt}
  native API (mTLS):      {native}
  operations:             {facts["listeners"]["ops"]["url"]}/readyz

Try it:
  curl --cacert {facts["ca_file"]} --cert {admin["cert"]} --key {admin["key"]} {native}/v1/keys
  curl --cacert {facts["ca_file"]} --cert {admin["cert"]} --key {admin["key"]} {native}/v1/keys/{key}
  {program} keys list -c {cfg}
  {program} demo -c {cfg}      # plays the platform: wraps a data key, unwraps it over Hawk
"""
