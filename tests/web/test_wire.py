"""The platform listener's HTTP/1.1 parsing and answers, as bytes in and out."""

from __future__ import annotations

import pytest

from lkm.errors import MalformedHttp, PayloadTooLarge
from lkm.web.wire import CHUNKED, dechunk, parse_head, response_bytes


def test_a_head_is_parsed_with_names_lowercased_once() -> None:
    request = parse_head(b"POST /a%2Fb?decryptType=pkcs1 HTTP/1.1\r\nHost: x:1\r\nCONTENT-length: 12\r\n"
                         b"X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2")
    assert (request.method, request.path, request.query) == ("POST", "/a/b", "decryptType=pkcs1")
    assert request.length == 12 and not request.close
    assert request.headers["host"] == "x:1" and request.headers["x-forwarded-for"] == "10.0.0.1, 10.0.0.2"


@pytest.mark.parametrize(("head", "status"), [
    (b"POST / HTTP/1.1\r\nContent-Length: -5", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: 1e3", 400),
    (b"POST / HTTP/1.1\r\nContent-Length: " + b"9" * 20, 400),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked", 411),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5", 411),
    (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked", 411),
    (b"POST / HTTP/1.1\r\nX: a\x00b", 400),
    (b"GET /\x01 HTTP/9.9", 400),
    (b"GET / HTTP/1.1\r\nno colon here", 400),
    (b"GET / HTTP/1.1\r\nX: " + b"A" * 9000, 431),
])
def test_what_the_platform_never_sends_is_refused(head: bytes, status: int) -> None:
    with pytest.raises(MalformedHttp) as caught:
        parse_head(head)
    assert caught.value.status == status
    assert b"\x00" not in str(caught.value).encode() and "AAAA" not in str(caught.value)


def test_connection_close_and_http_1_0() -> None:
    assert parse_head(b"GET / HTTP/1.1\r\nConnection: close").close
    assert parse_head(b"GET / HTTP/1.0").close
    assert not parse_head(b"GET / HTTP/1.0\r\nConnection: keep-alive").close
    assert parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked").length == CHUNKED


def test_chunked_bodies_are_read_in_pieces_and_bounded() -> None:
    whole = b"4\r\nabcd\r\n3;ext=1\r\nefg\r\n0\r\n\r\nNEXT"
    for cut in range(len(whole) - 4):
        assert dechunk(bytearray(whole[:cut]), 100) is None
    assert dechunk(bytearray(whole), 100) == (b"abcdefg", len(whole) - 4)
    with pytest.raises(PayloadTooLarge):
        dechunk(bytearray(b"ff\r\n"), 100)
    for bad in (b"zz\r\n", b"4\r\nabcdXX", b"0\r\nTrailer: x\r\n\r\n"):
        with pytest.raises(MalformedHttp):
            dechunk(bytearray(bad), 100)


@pytest.mark.slow
def test_an_answer_is_one_block_with_its_framing() -> None:
    raw = response_bytes(405, b"application/json", b"{}", "ab" * 16, {"Allow": "GET"}, close=True)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 405 Method Not Allowed" and body == b"{}"
    assert b"Content-Length: 2" in lines and b"Allow: GET" in lines and b"Connection: close" in lines
    assert b"X-Request-Id: " + b"ab" * 16 in lines
    assert response_bytes(200, b"text/plain", b"OK", None, head_only=True).endswith(b"\r\n\r\n")
