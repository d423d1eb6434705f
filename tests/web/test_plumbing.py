"""What every route shares: request ids, body parsing, the access log, error rendering."""

from __future__ import annotations

import json
import logging

import pytest
import yarl
from aiohttp.test_utils import make_mocked_request

from lkm.errors import InvalidRequest
from lkm.logs import JsonFormatter
from lkm.web.plumbing import MAX_LOGGED_PATH, RequestIds, cut_path, decode_b64, parse_json_object
from tests.conftest import Running, wrap


def test_request_ids_are_unique_32_hex_digits_and_differ_between_servers() -> None:
    ids = RequestIds()
    many = [ids.new() for _ in range(1000)]
    assert len(set(many)) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in many)
    assert RequestIds().new()[:16] != many[0][:16]


def test_logged_path_keeps_percent_encoding_drops_the_query_and_cuts_long_paths() -> None:
    assert cut_path(make_mocked_request("GET", "/a%0ab?x=%0a").raw_path) == "/a%0ab"
    long = cut_path(make_mocked_request("GET", "/" + "x" * 1000).raw_path)
    assert long == "/" + "x" * (MAX_LOGGED_PATH - 1) + "..."


@pytest.mark.parametrize("body", [b"", b"not json", b"[1, 2]", b'"text"', b"[" * 100_000])
def test_a_body_that_is_not_a_json_object_is_invalid_json(body: bytes) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_json_object(body)
    assert info.value.code == "invalid_json"


@pytest.mark.parametrize("value", [None, "", 12, "not base64!", "YQ"])
def test_bad_base64_is_invalid_base64_naming_the_field(value: object) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_b64(value, "wrapped_key")
    assert info.value.code == "invalid_base64" and "wrapped_key" in info.value.message


def test_good_base64_decodes() -> None:
    assert decode_b64("YWJj", "body") == b"abc"


async def test_access_log_is_one_json_line_per_request(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    record = running.create_key()
    caplog.set_level(logging.INFO, logger="lkm.access")
    reply = await running.platform().decrypt(record.id, wrap(record, b"l" * 32))
    lines = [r for r in caplog.records if r.name == "lkm.access"]
    assert len(lines) == 1
    data = json.loads(JsonFormatter().format(lines[0]))
    assert data["request_id"] == reply.headers["X-Request-Id"]
    assert data["status"] == 200 and data["route"] == "/key-management/v1/decrypt"
    assert data["latency_ms"] > 0 and data["listener"] == "platform"


async def test_access_log_keeps_the_path_encoded(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lkm.access")
    url = running.url("platform") + "/nope%0a2026-01-01%20forged%20line?x=%0a"
    async with running.session.get(yarl.URL(url, encoded=True), ssl=running.platform().ssl) as resp:
        assert resp.status == 404
    (line,) = [r for r in caplog.records if r.name == "lkm.access"]
    assert line.path == "/nope%0a2026-01-01%20forged%20line"  # as sent; no newline, no query
    assert line.route == "other"


