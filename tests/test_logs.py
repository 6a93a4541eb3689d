"""Log lines (worker.logs): JSON and text formats carry the ids of nested ``log_context``
blocks, lines outside any context carry none, and threads start without the caller's ids."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest

from worker.logs import QUIET_LOGGERS, configure_logging, current_ids, log_context

log = logging.getLogger("tests.logs")


@contextmanager
def logging_to(fmt: str, level: str = "info") -> Iterator[io.StringIO]:
    """``configure_logging`` onto a buffer for the duration; the root logger's handlers and
    every level it touched are put back afterwards (pytest's capture included)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    stream = io.StringIO()
    configure_logging(level, fmt, stream=stream)  # type: ignore[arg-type]
    try:
        yield stream
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        for name, level_no in saved[2].items():
            logging.getLogger(name).setLevel(level_no)


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_ids_of_nested_contexts():
    with logging_to("json") as stream:
        with log_context(tenant_id="t-1", batch_id="b-1"):
            with log_context(chunk_id="c-1", job_id="j-1"):
                log.info("job %s started", "j-1")
            log.warning("batch %s: one job retried", "b-1")
        log.info("outside")
    inner, outer, outside = json_lines(stream)
    ts = datetime.fromisoformat(str(inner.pop("ts")))
    assert ts.utcoffset() == timedelta(0) and abs(datetime.now(UTC) - ts) < timedelta(seconds=30)
    assert inner == {"level": "INFO", "logger": "tests.logs", "process": inner["process"],
                     "message": "job j-1 started", "tenant_id": "t-1", "batch_id": "b-1", "chunk_id": "c-1",
                     "job_id": "j-1"}
    assert outer["level"] == "WARNING" and outer["message"] == "batch b-1: one job retried"
    assert {k: outer[k] for k in outer if k.endswith("_id")} == {"tenant_id": "t-1", "batch_id": "b-1"}
    assert not any(k.endswith("_id") for k in outside) and "exc_info" not in outside


def test_inner_context_wins_and_leaving_it_restores_the_outer_ids():
    with logging_to("json") as stream:
        with log_context(job_id="outer", worker_id="gpu-0"):
            with log_context(job_id="inner", chunk_id=None):
                log.info("inner")
            log.info("outer")
    inner, outer = json_lines(stream)
    assert (inner["job_id"], inner["worker_id"], "chunk_id" in inner) == ("inner", "gpu-0", False)
    assert (outer["job_id"], outer["worker_id"]) == ("outer", "gpu-0")


def test_json_line_holds_the_traceback_and_extra_ids_override_the_context():
    with logging_to("json") as stream, log_context(job_id="j-1"):
        try:
            1 / 0  # noqa: B018 — raise something real
        except ZeroDivisionError:
            log.exception("chunk failed")
        log.info("for another job", extra={"job_id": "j-2"})
    failed, other = json_lines(stream)
    assert failed["level"] == "ERROR" and failed["job_id"] == "j-1"
    assert str(failed["exc_info"]).startswith("Traceback") and "ZeroDivisionError" in str(failed["exc_info"])
    assert other["job_id"] == "j-2"


def test_text_lines_show_the_ids_after_the_message():
    with logging_to("text") as stream:
        with log_context(tenant_id="t-1", chunk_id="c-1", job_id="j-1"):
            log.info("job %s succeeded in %.1f s", "j-1", 12.4)
        log.info("outside")
    with_ids, outside = stream.getvalue().splitlines()
    prefix = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO tests\.logs \[\d+\] "
    assert re.match(prefix + r"job j-1 succeeded in 12\.4 s \[tenant=t-1 chunk=c-1 job=j-1\]$", with_ids), with_ids
    assert re.match(prefix + r"outside$", outside), outside


def test_level_and_http_client_noise_follow_the_configuration():
    with logging_to("text", level="warning") as stream:
        log.info("hidden")
        log.warning("shown")
        assert logging.getLogger("httpx").level == logging.WARNING
    assert stream.getvalue().count("\n") == 1 and "shown" in stream.getvalue()


def test_a_new_thread_starts_without_ids_unless_they_are_passed_in():
    seen: dict[str, dict[str, str]] = {}

    def bare() -> None:
        seen["bare"] = current_ids()

    def carried(ids: dict[str, str]) -> None:
        with log_context(**ids):
            seen["carried"] = current_ids()

    with log_context(chunk_id="c-1"):
        for thread in (threading.Thread(target=bare), threading.Thread(target=carried, args=(current_ids(),))):
            thread.start()
            thread.join()
    assert seen == {"bare": {}, "carried": {"chunk_id": "c-1"}}
    assert current_ids() == {}


def test_unknown_ids_and_formats_are_refused():
    with pytest.raises(TypeError, match=r"unknown id\(s\) \['prompt'\]"), log_context(prompt="secret"):
        pass
    with pytest.raises(ValueError, match="log format 'yaml'"):
        configure_logging("info", "yaml")  # type: ignore[arg-type]
