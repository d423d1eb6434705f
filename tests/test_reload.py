"""Reload without downtime: renewed certificates reach new connections, open ones keep working."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from cryptography import x509

from lkm import pki
from lkm.config import load_settings
from lkm.errors import ConfigError
from lkm.serving import reload_from
from tests.conftest import Pki, Running, base_config, start_server, write_config
from tests.serveproc import peer_serial


@pytest.fixture
async def running(tmp_path: Path, own_certs: Pki) -> AsyncIterator[Running]:
    """A server on a private copy of the certificates: these tests renew and break them on disk."""
    async with start_server(tmp_path, own_certs, write_config(tmp_path, base_config(tmp_path, own_certs))) as handle:
        yield handle




def _renew_server_certificate(running: Running) -> int:
    renewed = pki.issue(running.certs.ca, "localhost", server=True, dns=("localhost",), ips=("127.0.0.1",))
    renewed.write(running.certs.dir / "server.pem", running.certs.dir / "server-key.pem")
    return x509.load_pem_x509_certificate((running.certs.dir / "server.pem").read_bytes()).serial_number


async def test_renewed_certificate_reaches_new_connections_while_an_old_one_keeps_working(running: Running) -> None:
    record = running.create_key()
    old_serial = await peer_serial(running.url("platform"), running.certs.ca_file)
    connector = aiohttp.TCPConnector(limit=1)  # one keep-alive connection, made before the renewal
    async with aiohttp.ClientSession(connector=connector) as session:
        native = running.native()
        native.session = session
        assert (await native.request("GET", f"/v1/keys/{record.id}")).status == 200
        new_serial = _renew_server_certificate(running)
        assert await reload_from(running.server, running.config_path) is None
        assert await peer_serial(running.url("platform"), running.certs.ca_file) == new_serial != old_serial
        assert await peer_serial(running.url("native"), running.certs.ca_file) == new_serial
        assert (await native.request("GET", f"/v1/keys/{record.id}")).status == 200
        assert len(connector._conns) == 1  # the same connection served both requests


async def test_a_bad_new_certificate_is_refused_and_the_old_one_stays(running: Running,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    old_serial = await peer_serial(running.url("platform"), running.certs.ca_file)
    (running.certs.dir / "server-key.pem").write_text("not a key\n")
    assert "cert_file/key_file" in (await reload_from(running.server, running.config_path) or "")
    assert "reload refused" in caplog.text
    assert await peer_serial(running.url("platform"), running.certs.ca_file) == old_serial
    with pytest.raises(ConfigError):
        running.server.reload(load_settings(running.config_path))


async def test_reload_applies_the_log_level_and_the_inline_hawk_credentials(running: Running,
                                                                            tmp_path: Path) -> None:
    config = yaml.safe_load(running.config_path.read_text())
    (tmp_path / "inline.key").write_text("an inline Hawk key of enough length\n")
    config["platform"]["hawk"]["credentials"] = [{"id": "inline-1", "key": {"file": str(tmp_path / "inline.key")}}]
    config["logging"]["level"] = "debug"
    running.config_path.write_text(yaml.safe_dump(config))
    assert running.server.hawk_source is not None and running.server.hawk_source.get("inline-1") is None
    assert await reload_from(running.server, running.config_path) is None
    assert running.server.hawk_source.get("inline-1") is not None
    assert running.server.hawk_source.get(running.hawk.id) is not None  # the file's credentials stay
    assert logging.getLogger().level == logging.DEBUG
