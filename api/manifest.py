"""A batch's manifest at any time: JSON pages and a streamed CSV of the same entries.

Owns: choosing the format (``?format=`` first, else the ``Accept`` header; JSON by default),
the page cursor (the position to start from), assembling a JSON page with the batch's counts
and last report number, and the CSV: one header row (``ManifestEntry``'s fields, in order),
RFC 4180 quoting (a prompt with commas, quotes or newlines stays one cell), written a page of
rows at a time, each page read in its own short transaction (on SQLite every transaction holds
the write lock, so none stays open while a slow client reads).

Spreadsheet formulas: a CSV cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a
carriage return gets a leading apostrophe, so Excel, LibreOffice and Google Sheets show it as
text instead of running it (OWASP's advice on CSV injection); the JSON is never altered.
Leaves the entries to ``api.views``, the report cursor (``since``) to ``worker.progress``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy.orm import Session

from api.schemas import Manifest, ManifestEntry
from api.views import manifest_entry
from worker import progress, queries
from worker.errors import InvalidParameter
from worker.models import Batch
from worker.settings import Settings
from worker.storage import ResultStore

CSV_MEDIA_TYPE = "text/csv; charset=utf-8"
CSV_PAGE_ROWS = 500
COLUMNS = tuple(ManifestEntry.model_fields)
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
MAX_CURSOR_DIGITS = 9


def wants_csv(fmt: str | None, accept: str | None) -> bool:
    """``format`` decides when given; else CSV when ``Accept`` rates ``text/csv`` above zero and
    no lower than ``application/json`` (``*/*`` alone: JSON)."""
    if fmt is not None:
        return fmt == "csv"
    quality = {"text/csv": 0.0, "application/json": 0.0}
    for item in (accept or "").split(","):
        media, *options = (part.strip() for part in item.split(";"))
        if media.lower() not in quality:
            continue
        q = 1.0
        for option in options:
            name, _, value = option.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        quality[media.lower()] = max(quality[media.lower()], q)
    return quality["text/csv"] > 0 and quality["text/csv"] >= quality["application/json"]


def start_position(cursor: str | None) -> int:
    """The position a page starts at: 0, or a ``next_cursor`` this API returned."""
    if cursor is None:
        return 0
    if not cursor.isdigit() or len(cursor) > MAX_CURSOR_DIGITS:
        raise InvalidParameter(f"cursor: {cursor[:40]!r} is not a cursor this API returned", field="cursor")
    return int(cursor)


def manifest_page(session: Session, batch: Batch, store: ResultStore, settings: Settings, *, since: int | None,
                  cursor: str | None, limit: int) -> Manifest:
    """Up to ``limit`` entries from ``cursor`` on (with ``since``: only jobs reported final after
    report ``since``), with the batch's counts and its last report number."""
    seq = batch.report_seq  # read before the jobs (see progress.manifest_jobs); get_batch loaded it fresh
    rows = progress.manifest_jobs(session, batch.id, start_position=start_position(cursor), since=since,
                                  limit=limit + 1)
    page, more = rows[:limit], len(rows) > limit
    counts = queries.batch_counts(session, batch.id)
    return Manifest(batch_id=batch.id, status="completed" if batch.completed_at else "active",
                    completed_at=batch.completed_at, counts=counts, done=progress.done_count(counts),
                    total=batch.job_count, seq=seq, metadata=dict(batch.meta or {}),
                    jobs=[manifest_entry(j, store, settings) for j in page],
                    next_cursor=str(page[-1].position + 1) if more else None)


def csv_cell(value: Any) -> str:
    """One CSV cell: empty for null, ``true``/``false``, text with a formula prefix neutralised."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    return f"'{text}" if text.startswith(FORMULA_PREFIXES) else text


def csv_chunks(sessions: Callable[[], Session], batch_id: str, store: ResultStore, settings: Settings, *,
               since: int | None, page_rows: int = CSV_PAGE_ROWS) -> Iterator[str]:
    """The manifest as CSV text: the header, then ``page_rows`` rows per chunk."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")  # RFC 4180; quotes cells with , " or newlines

    def take() -> str:
        text = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return text

    writer.writerow(COLUMNS)
    yield take()
    start = 0
    while True:
        with sessions() as session:
            rows = progress.manifest_jobs(session, batch_id, start_position=start, since=since, limit=page_rows)
            entries = [manifest_entry(j, store, settings).model_dump(mode="json") for j in rows]
            session.commit()
        for entry in entries:
            writer.writerow([csv_cell(entry[name]) for name in COLUMNS])
        if entries:
            yield take()
        if len(rows) < page_rows:
            return
        start = rows[-1].position + 1
