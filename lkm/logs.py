"""Logging set-up: one JSON object per line (or plain text), level from the config."""

from __future__ import annotations

import copy
import json
import logging
import queue
import sys
import time
from logging.handlers import QueueHandler, QueueListener
from typing import Any

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}
        return base + ("" if not extras else " " + " ".join(f"{k}={v}" for k, v in extras.items()))


class OffLoopHandler(QueueHandler):
    """Hands records to a writer thread: a slow stderr (a full pipe, a busy journald) must never stall the event
    loop. Formatting happens on that thread too. When the queue is full, records are dropped and counted: the
    audit trail, not the log, is the durable record of what lkm did."""

    def __init__(self, capacity: int = 100_000) -> None:
        super().__init__(queue.Queue(maxsize=capacity))
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        prepared = copy.copy(record)
        prepared.msg = record.getMessage()
        prepared.args = None
        return prepared

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


def setup_logging(level: str = "info", fmt: str = "json") -> QueueListener:
    """Routes every log record through a writer thread; the caller stops the returned listener at exit."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    off_loop = OffLoopHandler()
    listener = QueueListener(off_loop.queue, handler)
    listener.start()
    root = logging.getLogger()
    root.handlers[:] = [off_loop]
    root.setLevel(level.upper())
    # aiohttp's own access log is replaced by lkm.access (one line per request, with the request id).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return listener
