"""Logging set-up: one JSON object per line (or plain text), level from the config."""

from __future__ import annotations

import collections
import copy
import logging
import re
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any

from lkm.background import run_below_the_loop
from lkm.jsontext import one_shot_encoder
from lkm.threadnames import name_this_thread

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


_json_line = one_shot_encoder(default=str, separators=(",", ":"))
_PERCENT_FIELD = re.compile(r"%\((\w+)\)")
_LINE_FIELDS = frozenset({"asctime", "levelname", "name", "message"})  # what a DirectLine's record holds to format


class SecondCachedFormatter(logging.Formatter):
    """formatTime from the text of the current second, made once per second instead of once per record.

    `formats_fields`: whether `format_fields(line)` gives exactly what `format` gives for the record a
    `DirectLine` stands for (see `direct_writer`)."""

    _second: tuple[int, str | None, str] = (-1, None, "")  # the second, its datefmt and its text
    formats_fields = False

    def format_fields(self, line: DirectLine) -> str:
        raise NotImplementedError

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self._time_text(record.created, record.msecs, datefmt)

    def _time_text(self, created: float, msecs: float, datefmt: str | None) -> str:
        text = self._second_text(created, datefmt)
        if datefmt or not self.default_msec_format:
            return text
        return self.default_msec_format % (text, msecs)

    def _second_text(self, created: float, datefmt: str | None) -> str:
        second = int(created)
        cached, cached_fmt, text = self._second
        if second != cached or datefmt != cached_fmt:
            text = time.strftime(datefmt or self.default_time_format, self.converter(second))
            self._second = (second, datefmt, text)
        return text


class JsonFormatter(SecondCachedFormatter):
    formats_fields = True

    def format(self, record: logging.LogRecord) -> str:
        data = self._opening(record.created, record.msecs, record.levelname, record.name, record.getMessage())
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return _json_line(data)

    def format_fields(self, line: DirectLine) -> str:
        """What format() gives for the record `line` stands for: the same keys, values and order."""
        data = self._opening(line.created, line.msecs, logging.getLevelName(line.levelno), line.name, line.msg)
        for key, value in line.fields.items():
            if not key.startswith("_"):
                data[key] = value
        return _json_line(data)

    def _opening(self, created: float, msecs: float, levelname: str, name: str, message: str) -> dict[str, Any]:
        return {
            "time": self._second_text(created, "%Y-%m-%dT%H:%M:%S") + f".{int(msecs):03d}Z",
            "level": levelname.lower(),
            "logger": name,
            "message": message,
        }


class DirectLine:
    """A log line handed to the writer without a LogRecord (see `direct_writer`): what its record would hold
    beyond the constant fields. Its `fields` must not use a LogRecord attribute's name, as `extra` must not."""

    __slots__ = ("created", "fields", "levelno", "msecs", "msg", "name")

    def __init__(self, name: str, levelno: int, msg: str, fields: dict[str, Any]) -> None:
        self.name = name
        self.levelno = levelno
        self.msg = msg
        self.fields = fields
        self.created = now = time.time()
        self.msecs = int((now - int(now)) * 1000) + 0.0  # as LogRecord computes it


class TextFormatter(SecondCachedFormatter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A line is formatted without its record when the format names nothing else a line holds.
        style = self._style
        self.formats_fields = (type(style) is logging.PercentStyle
                               and set(_PERCENT_FIELD.findall(self._fmt or "")) <= _LINE_FIELDS)

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record) + _pairs((k, v) for k, v in record.__dict__.items() if k not in _STANDARD)

    def format_fields(self, line: DirectLine) -> str:
        values = {"levelname": logging.getLevelName(line.levelno), "name": line.name, "message": line.msg}
        if self.usesTime():
            values["asctime"] = self._time_text(line.created, line.msecs, self.datefmt)
        return (self._fmt or "%(message)s") % values + _pairs(line.fields.items())


def _pairs(fields: Iterable[tuple[str, Any]]) -> str:
    """A text line's extra fields, " k=v" each, leaving out private ones (a leading underscore)."""
    return "".join(f" {k}={v}" for k, v in fields if not k.startswith("_"))


class OffLoopHandler(logging.Handler):
    """Hands records to a writer thread that writes them out in batches.

    A slow stderr (a full pipe, a busy journald) must never stall the event loop, so nothing here writes. The
    writer does not wake per record either: it wakes every `interval` seconds (at once for a warning or worse,
    or when `capacity` is half used) and formats and writes everything queued in one write. On a busy server
    that is one thread wake-up per interval instead of one per request, and every wake-up is a thread asking
    for the GIL the event loop and the private-key workers are using. When the queue is full, records are
    dropped and counted: the audit trail, not the log, is the durable record of what lkm did.
    """

    def __init__(self, target: logging.Handler, *, interval: float = 0.05, capacity: int = 100_000) -> None:
        super().__init__()
        self.target = target
        self.interval = interval
        self.capacity = capacity
        self.dropped = 0
        self._pending: collections.deque[logging.LogRecord | DirectLine] = collections.deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lkm-log-writer", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        if len(self._pending) >= self.capacity:
            self.dropped += 1
            return
        if record.args:
            # Arguments are rendered now: a mutable argument could change before the writer formats it.
            record = copy.copy(record)
            record.msg = record.getMessage()
            record.args = None
        self._pending.append(record)  # deque.append is atomic: no lock on the caller's side
        if record.levelno >= logging.WARNING or len(self._pending) * 2 >= self.capacity:
            self._wake.set()

    def _run(self) -> None:
        name_this_thread()
        run_below_the_loop()
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            self._write_pending()
            if self._stopping and not self._pending:
                return

    def emit_direct(self, line: DirectLine) -> None:
        """Queues a line that `direct_writer` found would reach this handler alone, as a record, untouched."""
        if len(self._pending) >= self.capacity:
            self.dropped += 1
            return
        self._pending.append(line)

    def _write_pending(self) -> None:
        target = self.target
        lines: list[str] = []
        while self._pending:
            record = self._pending.popleft()
            try:
                if isinstance(record, DirectLine):
                    assert isinstance(target.formatter, SecondCachedFormatter)  # direct_writer's condition
                    lines.append(target.formatter.format_fields(record))
                else:
                    lines.append(target.format(record))
            except Exception:  # a record that cannot be formatted must not stop the writer
                if isinstance(record, DirectLine):
                    self.dropped += 1
                else:
                    self.handleError(record)
        if not lines:
            return
        stream = getattr(target, "stream", None)
        if stream is None:
            return
        try:
            stream.write("\n".join(lines) + "\n")
            stream.flush()
        except (OSError, ValueError):  # stderr closed or broken: nothing better to do with a log line
            self.dropped += len(lines)

    def stop(self) -> None:
        """Writes out what is queued and stops the writer."""
        self._stopping = True
        self._wake.set()
        self._thread.join()


class RecordTemplates(threading.local):
    """Log records for a fixed message, made without `LogRecord.__init__` (about 10 µs of the access log's 12).

    A record's constant fields (logger, level, message, source, process and thread names) are taken once per
    thread from a record the logger made itself; each new record copies them and sets its time and `extra`.
    The result is the record `logger.makeRecord` would have built: the same attributes, the same values.
    """

    def __init__(self, source: str) -> None:
        self.source = source  # the file the records name as their origin, as makeRecord's `fn`
        self.made: dict[tuple[str, int, str], tuple[dict[str, Any], float]] = {}

    def record(self, logger: logging.Logger, level: int, msg: str, extra: dict[str, Any]) -> logging.LogRecord:
        """A record of `msg` (no arguments) with `extra`, whose keys must not clash with a record's own."""
        key = (logger.name, level, msg)
        made = self.made.get(key)
        if made is None:
            first = logger.makeRecord(logger.name, level, self.source, 0, msg, (), None)
            made = self.made[key] = (dict(first.__dict__), first.created - first.relativeCreated / 1000)
        fields, started = made
        record = logging.LogRecord.__new__(logging.LogRecord)
        attributes = record.__dict__
        attributes.update(fields)
        now = time.time()
        attributes["created"] = now
        attributes["msecs"] = int((now - int(now)) * 1000) + 0.0
        attributes["relativeCreated"] = (now - started) * 1000
        attributes.update(extra)
        return record


def direct_writer(logger: logging.Logger, level: int) -> OffLoopHandler | None:
    """The handler that would be the only one to see a record of `logger` at `level` (which the caller found
    enabled), with no filter to change it and a formatter that `formats_fields`: `setup_logging`'s, as the
    server runs, in either format. Then a `DirectLine` may stand in for the record, and the record's making
    and dispatch are skipped. Anything else (a handler added anywhere on the way, a filter, a format naming
    other record attributes, a test capturing records): None.
    """
    if logger.disabled or logger.filters:
        return None
    node = logger
    while node.parent is not None:  # up to the root: no handler on the way, and every level propagates
        if node.handlers or not node.propagate:
            return None
        node = node.parent
    handlers = node.handlers
    if len(handlers) != 1:
        return None
    handler = handlers[0]
    if type(handler) is not OffLoopHandler or handler.filters or level < handler.level:
        return None
    formatter = handler.target.formatter
    if not isinstance(formatter, SecondCachedFormatter) or not formatter.formats_fields:
        return None
    return handler


def setup_logging(level: str = "info", fmt: str = "json") -> OffLoopHandler:
    """Routes every log record through a writer thread; the caller stops the returned handler at exit."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    off_loop = OffLoopHandler(handler)
    root = logging.getLogger()
    root.handlers[:] = [off_loop]
    root.setLevel(level.upper())
    # aiohttp's own access log is replaced by lkm.access (one line per request, with the request id).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return off_loop
