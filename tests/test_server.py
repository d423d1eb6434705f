"""The server as composed: which listeners come up, their URLs, and that stop() takes them down."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from lkm.client import NativeClient, client_ssl_context
from lkm.config import load_settings
from lkm.keys import KeyState
from lkm.server import LkmServer
from lkm.web.routes import ListenerName
from tests.conftest import Running, b64, wrap


async def test_every_listener_comes_up_on_its_own_port(running: Running) -> None:
    listeners = running.server.listeners
    assert set(listeners) == set(ListenerName)
    assert len({listener.port for listener in listeners.values()}) == 3
    assert running.server.url("platform").startswith("https://localhost:")
    assert running.server.url("native").startswith("https://localhost:")
    assert running.server.url("ops") == f"http://localhost:{listeners['ops'].port}"


async def test_stop_closes_every_listener(tmp_path, certs, config_factory) -> None:  # type: ignore[no-untyped-def]
    server = LkmServer(load_settings(config_factory()))
    await server.start()
    ports = [listener.port for listener in server.listeners.values()]
    await server.stop()
    for port in ports:
        with pytest.raises(ConnectionRefusedError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()


async def test_a_native_only_server(tmp_path, certs, config_factory) -> None:  # type: ignore[no-untyped-def]
    server = LkmServer(load_settings(config_factory(platform={"enabled": False})))
    await server.start()
    try:
        assert set(server.listeners) == {"native", "ops"}
        assert server.store is not None
        record = server.store.create_key(state=KeyState.ACTIVE)
        async with aiohttp.ClientSession() as session:
            cert, key = certs.client("admin")
            native = NativeClient(session, server.url("native"), client_ssl_context(certs.ca_file, cert, key))
            reply = await native.unwrap(record.id, wrap(record, b"n" * 32))
            assert reply.status == 200 and reply.body["key"] == b64(b"n" * 32)
    finally:
        await server.stop()
