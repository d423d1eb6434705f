"""HTTP/1.1 on the wire for the platform listener: a request head parsed with bytes operations, an answer built whole.

    parse_head      a request head (up to its blank line) -> WireRequest, or MalformedHttp with the status to answer
    response_bytes  status line (pre-built per status), headers and body in one bytes object
    error_body      the platform's error shape

What the platform never sends is refused: transfer codings other than chunked (411), duplicate framing
headers, bad bytes (400), over-long lines (431). Chunked bodies (aiohttp's client sends them for streamed data)
are read, bounded like any body. Errors carry none of the request's bytes.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from email.utils import formatdate
from http import HTTPStatus

from lkm.errors import MalformedHttp, PayloadTooLarge

MAX_HEAD = 8190 + 16 * 8190  # aiohttp's own bounds: a request line and field lines of at most 8190 bytes each
MAX_LINE = 8190
MAX_CHUNK_LINE = 64
CHUNKED = -1  # WireRequest.length of a chunked body
_HEX = re.compile(rb"[0-9A-Fa-f]{1,8}")
_CONTROL = bytes([*range(0x09), *range(0x0a, 0x20), 0x7f])  # control characters (tab allowed) in a line or field
_BAD_BYTES = re.compile(b"[" + re.escape(_CONTROL) + b"]")  # the same bytes, for a search
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
JSON = b"application/json; charset=utf-8"
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}


class WireRequest:
    __slots__ = ("close", "headers", "length", "method", "path", "query", "raw_path", "target")

    def __init__(self, method: str, target: str, headers: dict[str, str], length: int, close: bool) -> None:
        self.method = method
        self.target = target
        self.raw_path, _, self.query = target.partition("?")  # as sent: what Hawk's MAC covers
        self.path = urllib.parse.unquote(self.raw_path) if "%" in self.raw_path else self.raw_path
        self.headers = headers
        self.length = length
        self.close = close


class _Date:
    """The Date header, formatted once a second."""

    second = -1
    value = b""

    @classmethod
    def now(cls) -> bytes:
        second = int(time.time())
        if second != cls.second:
            cls.second, cls.value = second, formatdate(second, usegmt=True).encode("ascii")
        return cls.value


def parse_head(head: bytes) -> WireRequest:
    """A request head (without its blank line) parsed, or MalformedHttp: never any of its bytes in the error."""
    lines = head.split(b"\r\n")
    # Every request pays for these checks, so first the cheapest form: the head's control bytes are exactly its
    # line breaks (bytes.translate counts them in one C pass; a regex scan took 3 µs); line by line only to
    # name a fault.
    if max(map(len, lines)) > MAX_LINE or len(head) - len(head.translate(None, _CONTROL)) != 2 * (len(lines) - 1):
        for line in lines:
            if len(line) > MAX_LINE:
                raise MalformedHttp(431, "LineTooLong")
            if _BAD_BYTES.search(line):
                raise MalformedHttp(400, "BadCharacter")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1].startswith(b"/") \
            or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise MalformedHttp(400, "BadStatusLine")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise MalformedHttp(400, "BadHeaderLine")
        key = name.lower().decode("ascii")
        text = value.strip(b" \t").decode("latin-1")
        if key in headers:
            if key in ("content-length", "host", "authorization", "transfer-encoding"):
                raise MalformedHttp(400, "DuplicateHeader")
            text = f"{headers[key]}, {text}"
        headers[key] = text
    coding = headers.get("transfer-encoding")
    # Only plain chunked, and never beside a Content-Length (request smuggling).
    if coding is not None and (coding.lower() != "chunked" or "content-length" in headers
                               or parts[2] != b"HTTP/1.1"):
        raise MalformedHttp(411, "TransferEncoding")
    length_text = headers.get("content-length", "0")
    if not length_text.isdigit() or not length_text.isascii() or len(length_text) > 12:
        raise MalformedHttp(400, "BadContentLength")
    connection = headers.get("connection", "").lower()
    close = "close" in connection if parts[2] == b"HTTP/1.1" else "keep-alive" not in connection
    return WireRequest(parts[0].decode("ascii"), parts[1].decode("latin-1"), headers,
                       CHUNKED if coding is not None else int(length_text), close)


def dechunk(buffer: bytearray, limit: int) -> tuple[bytes, int] | None:
    """A chunked body from the start of `buffer`: (body, bytes it took), or None while it is incomplete.

    Raises MalformedHttp for a bad chunk line or trailers, PayloadTooLarge past `limit`."""
    pos = 0
    parts: list[bytes] = []
    total = 0
    while True:
        eol = buffer.find(b"\r\n", pos)
        if eol < 0:
            if len(buffer) - pos > MAX_CHUNK_LINE:
                raise MalformedHttp(400, "BadChunkSize")
            return None
        line = bytes(buffer[pos:eol]).split(b";", 1)[0].strip(b" \t")
        if not line or len(line) > MAX_CHUNK_LINE or not _HEX.fullmatch(line):
            raise MalformedHttp(400, "BadChunkSize")
        size = int(line, 16)
        pos = eol + 2
        if size == 0:
            if len(buffer) < pos + 2:
                return None
            if buffer[pos:pos + 2] != b"\r\n":
                raise MalformedHttp(400, "ChunkTrailers")
            return b"".join(parts), pos + 2
        total += size
        if total > limit:
            raise PayloadTooLarge(f"request body larger than {limit} bytes")
        if len(buffer) < pos + size + 2:
            return None
        if buffer[pos + size:pos + size + 2] != b"\r\n":
            raise MalformedHttp(400, "BadChunk")
        parts.append(bytes(buffer[pos:pos + size]))
        pos += size + 2


def response_bytes(status: int, content_type: bytes, body: bytes, request_id: str | None,
                   extra: dict[str, str] | None = None, *, close: bool = False, head_only: bool = False) -> bytes:
    """One whole answer: status line, headers, body."""
    parts = [_STATUS_LINES.get(status) or f"HTTP/1.1 {status} Unknown\r\n".encode(),
             b"Content-Type: ", content_type, b"\r\nContent-Length: ", str(len(body)).encode(),
             b"\r\nDate: ", _Date.now(), b"\r\n"]
    if request_id is not None:
        parts += [b"X-Request-Id: ", request_id.encode(), b"\r\n"]
    if extra:
        parts += [f"{name}: {value}\r\n".encode("latin-1") for name, value in extra.items()]
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    if not head_only:
        parts.append(body)
    return b"".join(parts)


def error_body(status: int, message: str) -> bytes:
    return json.dumps({"message": message, "status": status}).encode()
