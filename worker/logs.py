"""Log configuration for every entry point, and the ids that ride along with log lines.

Owns: ``configure_logging(level, fmt)`` (a drop-in replacement for ``worker.cli``'s
``_configure_logging(level)``), the two line formats, and ``log_context(**ids)``, which makes
job, batch, chunk, tenant and worker ids part of every line logged inside it. Leaves choosing
level and format to the entry points (``Settings.log_format``).

- ``text``: ``LOG_FORMAT`` (time, level, logger, pid, message) followed by
  `` [tenant=… batch=… chunk=… job=… worker=…]`` with the ids that are set, if any.
- ``json``: one object per line: ``ts`` (ISO 8601 UTC), ``level``, ``logger``, ``process``,
  ``message``, each id that is set (``job_id``, ``batch_id``, ``chunk_id``, ``tenant_id``,
  ``worker_id``), and ``exc_info`` (the traceback text) when there is one.

Ids live in a ``ContextVar``: nested ``log_context`` blocks merge (the inner value wins for the
same key) and leaving a block restores the outer ids; asyncio tasks inherit them. A new thread
starts with none: pass ``current_ids()`` into it and enter ``log_context(**ids)`` there. An id
given as ``extra={"job_id": …}`` on a single call overrides the context for that line.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import MappingProxyType
from typing import IO, Literal

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"
# Broad to narrow; the text suffix shows them in this order under their short names.
ID_FIELDS = ("tenant_id", "batch_id", "chunk_id", "job_id", "worker_id")
QUIET_LOGGERS = ("httpx", "httpcore", "alembic.runtime.plugins")  # one line per HTTP call is noise at INFO

_ids: ContextVar[Mapping[str, str]] = ContextVar("bagel_log_ids", default=MappingProxyType({}))


@contextmanager
def log_context(**ids: object) -> Iterator[None]:
    """Lines logged inside carry ``ids`` (any of ``ID_FIELDS``) on top of the enclosing
    context's; ``None`` values are skipped. Unknown names raise ``TypeError``."""
    unknown = sorted(set(ids) - set(ID_FIELDS))
    if unknown:
        raise TypeError(f"log_context: unknown id(s) {unknown}; allowed: {list(ID_FIELDS)}")
    merged = {**_ids.get(), **{k: str(v) for k, v in ids.items() if v is not None}}
    token = _ids.set(merged)
    try:
        yield
    finally:
        _ids.reset(token)


def current_ids() -> dict[str, str]:
    """The ids in force here (a copy), e.g. to carry them into a new thread."""
    return dict(_ids.get())


def record_ids(record: logging.LogRecord) -> dict[str, str]:
    """The record's ids in ``ID_FIELDS`` order: the context's, overridden by ``extra=``."""
    ids = _ids.get()
    out: dict[str, str] = {}
    for name in ID_FIELDS:
        value = getattr(record, name, None)
        if value is None:
            value = ids.get(name)
        if value is not None:
            out[name] = str(value)
    return out


class TextFormatter(logging.Formatter):
    """``LOG_FORMAT`` plus `` [chunk=… job=…]`` when ids are set (before any traceback)."""

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 — the stdlib's name
        line = super().formatMessage(record)
        ids = record_ids(record)
        if not ids:
            return line
        shown = " ".join(f"{name.removesuffix('_id')}={value}" for name, value in ids.items())
        return f"{line} [{shown}]"


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring for the keys)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
            **record_ids(record),
        }
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc_info"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(level: str, fmt: Literal["text", "json"] = "text", stream: IO[str] | None = None) -> None:
    """Replace the root logger's handlers with one on ``stream`` (stderr) in ``fmt``, at
    ``level`` (a name such as "info"); HTTP client loggers stay at WARNING or above."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format {fmt!r} is not one of 'text', 'json'")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
