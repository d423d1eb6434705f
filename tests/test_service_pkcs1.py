"""PKCS#1 v1.5 answers of constant length (platform.pkcs1_data_key_length), against the real server.

With decryptType=pkcs1, whether the padding was valid must not show in the answer: every answer is as long as the
platform's data keys, a wrong padding or length answers a synthetic value derived from the store's secret, the same
for the same ciphertext in every process.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric import padding

from lkm.client import PlatformClient, Reply, client_ssl_context
from lkm.keys import KeyRecord
from tests.conftest import Pki, Running, start_server, wrap
from tests.serveproc import ServeProcess, prepare

PKCS1 = padding.PKCS1v15()


def random_ciphertext(record: KeyRecord) -> bytes:
    """A random number below the modulus: any such number is a ciphertext the key decrypts to something.
    (One above it is refused as malformed, which anybody holding the public key can tell anyway.)"""
    modulus = record.public_key.public_numbers().n
    return (secrets.randbelow(modulus - 1) + 1).to_bytes(384, "big")


def answer(reply: Reply) -> bytes:
    return base64.b64decode(reply.body["body"])


@pytest.mark.slow
async def test_every_pkcs1_answer_is_32_bytes_and_invalid_ones_are_stable(running: Running) -> None:
    record = running.create_key()
    await running.server.refresh()
    client = running.platform()
    lengths: dict[int, int] = {}
    for _ in range(500):
        reply = await client.decrypt(record.id, random_ciphertext(record), pkcs1=True)
        assert reply.status == 200, reply.body
        lengths[len(answer(reply))] = lengths.get(len(answer(reply)), 0) + 1
    assert lengths == {32: 500}, lengths
    bad = random_ciphertext(record)
    first = answer(await client.decrypt(record.id, bad, pkcs1=True))
    assert answer(await client.decrypt(record.id, bad, pkcs1=True)) == first
    # A valid 32-byte key is the real key; a valid padding around another length is not revealed.
    assert answer(await client.decrypt(record.id, wrap(record, b"d" * 32, PKCS1), pkcs1=True)) == b"d" * 32
    short = answer(await client.decrypt(record.id, wrap(record, b"s" * 16, PKCS1), pkcs1=True))
    assert len(short) == 32 and short != b"s" * 16
    empty = answer(await client.decrypt(record.id, wrap(record, b"", PKCS1), pkcs1=True))
    assert len(empty) == 32


async def test_off_answers_plaintexts_of_any_length(tmp_path: Path, certs: Pki,
                                                    config_factory: Callable[..., Path]) -> None:
    config = config_factory(**{"platform.pkcs1_data_key_length": "off"})
    async with start_server(tmp_path, certs, config) as running:
        record = running.create_key()
        await running.server.refresh()
        reply = await running.platform().decrypt(record.id, wrap(record, b"s" * 16, PKCS1), pkcs1=True)
        assert reply.status == 200 and answer(reply) == b"s" * 16


@pytest.mark.slow
async def test_two_worker_processes_answer_an_invalid_ciphertext_alike(tmp_path: Path, certs: Pki,
                                                                       config_factory: Callable[..., Path]) -> None:
    config = config_factory(**{"limits.workers": 2})
    credential, record = prepare(config)
    bad = random_ciphertext(record)
    with ServeProcess(config, tmp_path / "serve.log") as server:
        url = server.urls["platform"] + "/key-management/v1/decrypt"

        async def once() -> bytes:
            # A new connection each time, so the kernel spreads them over both workers.
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as session:
                client = PlatformClient(session, url, credential, client_ssl_context(certs.ca_file))
                reply = await client.decrypt(record.id, bad, pkcs1=True)
                assert reply.status == 200, reply.body
                return answer(reply)

        answers = {await once() for _ in range(24)}
        assert len(answers) == 1 and len(answers.pop()) == 32
