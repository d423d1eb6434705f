"""Logging set-up: JSON and text lines, and the writer thread that keeps log output off the event loop."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lkm.logs import (
    DirectLine,
    JsonFormatter,
    OffLoopHandler,
    RecordTemplates,
    SecondCachedFormatter,
    TextFormatter,
    direct_writer,
    setup_logging,
)
from lkm.web.plumbing import WebObserver, finish_request


def _record(msg: str = "request", **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("lkm.access", logging.INFO, __file__, 1, msg, (), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_lines_carry_the_extra_fields_and_never_the_private_ones() -> None:
    data = json.loads(JsonFormatter().format(_record(request_id="abc", status=200, _private="x")))
    assert data["request_id"] == "abc" and data["status"] == 200
    assert data["message"] == "request" and data["logger"] == "lkm.access" and data["level"] == "info"
    assert "_private" not in data and "msg" not in data and "args" not in data


def test_json_line_is_one_line_even_for_a_newline_in_a_field() -> None:
    line = JsonFormatter().format(_record(path="/a\nforged"))
    assert "\n" not in line and json.loads(line)["path"] == "/a\nforged"


def test_text_lines_append_the_extra_fields() -> None:
    line = TextFormatter("%(levelname)s %(name)s: %(message)s").format(_record(status=404))
    assert line == "INFO lkm.access: request status=404"


class _HeldFormatter(logging.Formatter):
    """Holds the writer thread inside its first format() until released, so the queue can be filled."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def format(self, record: logging.LogRecord) -> str:
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(10)
        return record.getMessage()


def test_a_full_queue_drops_and_counts(tmp_path: Path) -> None:
    out = (tmp_path / "log.txt").open("w", encoding="utf-8")
    target = logging.StreamHandler(out)
    held = _HeldFormatter()
    target.setFormatter(held)
    writer = OffLoopHandler(target, interval=30.0, capacity=4)
    try:
        warning = _record("first")
        warning.levelno = logging.WARNING
        writer.emit(warning)  # wakes the writer, which then holds in format()
        assert held.entered.wait(10)
        for i in range(6):
            writer.emit(_record(f"line {i}"))
        assert writer.dropped == 2
        held.release.set()
    finally:
        held.release.set()
        writer.stop()
        out.close()
    lines = (tmp_path / "log.txt").read_text(encoding="utf-8").splitlines()
    assert lines == ["first"] + [f"line {i}" for i in range(4)]


def test_logs_are_written_off_the_loop_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    writer = setup_logging("info", "json")
    try:
        logging.getLogger("lkm.access").info("request", extra={"request_id": "abc", "status": 200})
        logging.getLogger("lkm.test").debug("below the level")
    finally:
        writer.stop()
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert len(lines) == 1
    assert lines[0]["request_id"] == "abc" and lines[0]["status"] == 200
    assert lines[0]["level"] == "info" and lines[0]["logger"] == "lkm.access" and lines[0]["time"].endswith("Z")


def test_log_writer_batches_lines_and_writes_warnings_at_once(tmp_path: Path) -> None:
    out = (tmp_path / "log.txt").open("w+", encoding="utf-8")
    target = logging.StreamHandler(out)
    target.setFormatter(JsonFormatter())
    writer = OffLoopHandler(target, interval=30.0)  # no timed flush during the test
    logger = logging.getLogger("lkm.test.batch")
    logger.addHandler(writer)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        for i in range(5):
            logger.info("line %d", i)
        assert out.tell() == 0  # queued, not yet written: no thread wake-up per line
        logger.warning("needs attention")

        def written() -> list[str]:
            out.flush()
            return (tmp_path / "log.txt").read_text(encoding="utf-8").splitlines()

        deadline = time.monotonic() + 5
        while len(written()) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
        messages = [json.loads(line)["message"] for line in written()]
        assert messages == [f"line {i}" for i in range(5)] + ["needs attention"]
    finally:
        logger.removeHandler(writer)
        writer.stop()
        out.close()


def test_a_templated_record_is_the_record_make_record_builds() -> None:
    logger = logging.getLogger("lkm.access")
    templates = RecordTemplates(__file__)
    extra = {"request_id": "abc", "status": 200}
    made = [templates.record(logger, logging.INFO, "request", dict(extra)) for _ in range(2)]
    expected = logger.makeRecord(logger.name, logging.INFO, __file__, 0, "request", (), None, extra=dict(extra))
    timing = {"created", "msecs", "relativeCreated"}
    for record in made:
        assert set(record.__dict__) == set(expected.__dict__)
        assert {k: v for k, v in record.__dict__.items() if k not in timing} == \
            {k: v for k, v in expected.__dict__.items() if k not in timing}
        assert abs(record.created - expected.created) < 5 and record.msecs == int(record.created % 1 * 1000)
        assert abs(record.relativeCreated - expected.relativeCreated) < 5000
    assert made[0].created <= made[1].created and made[0].__dict__ is not made[1].__dict__
    assert json.loads(JsonFormatter().format(made[1]))["request_id"] == "abc"
    seen: list[str] = []
    thread = threading.Thread(target=lambda: seen.append(templates.record(logger, logging.INFO, "request",
                                                                          {}).threadName), name="other")
    thread.start()
    thread.join()
    assert seen == ["other"]  # each thread's records name that thread


@pytest.mark.parametrize("datefmt", [None, "%Y-%m-%dT%H:%M:%S"])
def test_times_formatted_once_a_second_read_as_logging_formats_them(datefmt: str | None) -> None:
    ours, stock = TextFormatter("%(asctime)s %(message)s"), logging.Formatter("%(asctime)s %(message)s")
    for created in (1_700_000_000.001, 1_700_000_000.999, 1_700_000_001.5, 1_700_000_000.25, 1_700_000_061.0):
        record = _record()
        record.created, record.msecs = created, int(created % 1 * 1000) + 0.0
        assert ours.formatTime(record, datefmt) == stock.formatTime(record, datefmt)


@contextlib.contextmanager
def server_set_up() -> Iterator[OffLoopHandler]:
    """The logging set-up a server process makes (JSON, one off-loop handler on the root), undone afterwards.
    Made inside a test's body: pytest adds its own capturing handler to the root for each phase of a test."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    writer = setup_logging("info", "json")
    try:
        yield writer
    finally:
        writer.stop()
        root.handlers[:], level = saved
        root.setLevel(level)


@pytest.mark.parametrize("formatter", [
    JsonFormatter(),
    TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"),  # setup_logging's
    TextFormatter("%(message)s at %(asctime)s", datefmt="%H:%M"),
    TextFormatter(),
], ids=["json", "text", "text-datefmt", "text-bare"])
def test_a_direct_line_is_formatted_as_its_record_would_be(formatter: SecondCachedFormatter) -> None:
    assert formatter.formats_fields
    fields = {"request_id": "abc", "status": 200, "path": "/a\nb", "latency_ms": 1.5, "client": None, "_x": 1}
    line = DirectLine("lkm.access", logging.INFO, "request", dict(fields))
    record = RecordTemplates(__file__).record(logging.getLogger("lkm.access"), logging.INFO, "request", dict(fields))
    record.created, record.msecs = line.created, line.msecs
    for _ in range(2):  # the second time from the cached second
        assert formatter.format_fields(line) == formatter.format(record)


def test_the_json_line_opens_with_its_constant_fields() -> None:
    line = DirectLine("lkm.access", logging.INFO, "request", {"request_id": "abc"})
    assert list(json.loads(JsonFormatter().format_fields(line))) == ["time", "level", "logger", "message",
                                                                      "request_id"]


@pytest.mark.parametrize("formatter", [
    TextFormatter("%(process)d %(message)s"),
    TextFormatter("{asctime} {message}", style="{"),
    TextFormatter("%(message)s %(host)s", defaults={"host": "h"}),
], ids=["another-attribute", "brace-style", "a-default"])
def test_a_text_format_naming_more_than_a_line_holds_is_not_formatted_directly(
        formatter: SecondCachedFormatter) -> None:
    assert not formatter.formats_fields


def test_the_access_line_goes_direct_under_the_server_set_up(capsys: pytest.CaptureFixture[str]) -> None:
    access = logging.getLogger("lkm.access")
    with server_set_up() as server_logging:
        assert direct_writer(access, logging.INFO) is server_logging
        direct: list[DirectLine] = []
        real = server_logging.emit_direct
        server_logging.emit_direct = lambda line: direct.append(line) or real(line)  # type: ignore[method-assign]
        finish_request(WebObserver(), "platform", request_id="r1", route="/d", status=200,
                       started=time.perf_counter(), method="POST", raw_path="/d?x=1", client=lambda: "10.0.0.1",
                       actor=None)
    assert [line.fields["request_id"] for line in direct] == ["r1"]
    (line,) = [json.loads(text) for text in capsys.readouterr().err.splitlines()]
    assert {k: v for k, v in line.items() if k not in ("time", "latency_ms")} == {
        "level": "info", "logger": "lkm.access", "message": "request", "request_id": "r1", "listener": "platform",
        "method": "POST", "route": "/d", "path": "/d", "status": 200, "client": "10.0.0.1", "actor": None}


def test_anything_that_could_see_or_change_the_record_turns_the_direct_line_off() -> None:
    with server_set_up() as server_logging:
        check_every_change_turns_it_off(server_logging)


def check_every_change_turns_it_off(server_logging: OffLoopHandler) -> None:
    access, lkm, root = logging.getLogger("lkm.access"), logging.getLogger("lkm"), logging.getLogger()
    extra_handler = logging.NullHandler()
    changes: list[tuple[Callable[[], None], Callable[[], None]]] = [
        (lambda: access.addHandler(extra_handler), lambda: access.removeHandler(extra_handler)),
        (lambda: lkm.addHandler(extra_handler), lambda: lkm.removeHandler(extra_handler)),
        (lambda: root.addHandler(extra_handler), lambda: root.removeHandler(extra_handler)),
        (lambda: access.addFilter(lambda r: True), access.filters.clear),
        (lambda: server_logging.addFilter(lambda r: True), server_logging.filters.clear),
        (lambda: setattr(lkm, "propagate", False), lambda: setattr(lkm, "propagate", True)),
        (lambda: setattr(access, "disabled", True), lambda: setattr(access, "disabled", False)),
        (lambda: server_logging.setLevel(logging.WARNING), lambda: server_logging.setLevel(logging.NOTSET)),
        (lambda: server_logging.target.setFormatter(TextFormatter("%(process)d %(message)s")),
         lambda: server_logging.target.setFormatter(JsonFormatter())),
        (lambda: server_logging.target.setFormatter(logging.Formatter()),
         lambda: server_logging.target.setFormatter(JsonFormatter())),
    ]
    for change, undo in changes:
        change()
        try:
            assert direct_writer(access, logging.INFO) is None
        finally:
            undo()
        assert direct_writer(access, logging.INFO) is server_logging


def test_a_test_capturing_records_still_sees_the_access_record(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lkm.access")
    finish_request(WebObserver(), "platform", request_id="r2", route="/d", status=404, started=time.perf_counter(),
                   method="GET", raw_path="/d", client=lambda: None, actor=None)
    (record,) = [r for r in caplog.records if r.name == "lkm.access"]
    assert record.request_id == "r2" and record.status == 404  # type: ignore[attr-defined]
