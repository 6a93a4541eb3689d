"""A batch's results as one zip, streamed: the gallery's "Download all".

Owns: the archive — ``manifest.csv`` (the batch's CSV manifest, as ``GET …/manifest?format=csv``
gives it) first, then every succeeded result still stored, named by position
(``0003-<job id>.png``), stored uncompressed (PNGs are compressed already). It is written to a
non-seekable sink (``zipfile`` then puts each entry's sizes in a data descriptor after it), and
its bytes are handed out as each entry is written: one result is in memory at a time, and the
jobs are read a page at a time, each page in its own short transaction (on SQLite a
transaction holds the write lock). Leaves the CSV to ``api.manifest`` and reading the objects
to the store.

A result whose object is gone (deleted by retention between the read of its row and the
download) is left out with a warning; the manifest still lists it.
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Callable, Iterator
from pathlib import PurePosixPath

from sqlalchemy.orm import Session

from api import manifest
from worker import progress
from worker.errors import ObjectNotFound
from worker.models import JobStatus
from worker.settings import Settings
from worker.storage import ResultStore

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/zip"
MANIFEST_NAME = "manifest.csv"
PAGE_ROWS = 500


class _Sink(io.RawIOBase):
    """A write-only, non-seekable stream whose bytes are taken out after each entry."""

    def __init__(self) -> None:
        super().__init__()
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def entry_name(position: int, job_id: str, key: str) -> str:
    """``0003-<job id>.png``: sorted by position in any file manager."""
    return f"{position:04d}-{job_id}{PurePosixPath(key).suffix or '.png'}"


def _stored_results(sessions: Callable[[], Session], batch_id: str, page_rows: int) -> Iterator[tuple[str, str]]:
    """(entry name, object key) of each succeeded job with a stored result, in position order."""
    start = 0
    while True:
        with sessions() as session:
            rows = progress.manifest_jobs(session, batch_id, start_position=start, limit=page_rows)
            found = [(entry_name(j.position, j.id, j.output_key), j.output_key) for j in rows
                     if JobStatus(j.status) == JobStatus.succeeded and j.output_key and j.result_expired_at is None]
            session.commit()
        yield from found
        if len(rows) < page_rows:
            return
        start = rows[-1].position + 1


def zip_chunks(sessions: Callable[[], Session], batch_id: str, store: ResultStore, settings: Settings, *,
               page_rows: int = PAGE_ROWS) -> Iterator[bytes]:
    """The archive's bytes, a piece per entry written."""
    sink = _Sink()
    written = 0
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as archive:
        with archive.open(MANIFEST_NAME, "w") as csv_entry:
            for text in manifest.csv_chunks(sessions, batch_id, store, settings, since=None):
                csv_entry.write(text.encode())
                yield sink.take()
        for name, key in _stored_results(sessions, batch_id, page_rows):
            try:
                data = store.get(key)
            except ObjectNotFound:
                log.warning("batch %s zip: %s is no longer stored; left out", batch_id, key)
                continue
            archive.writestr(name, data)
            written += 1
            yield sink.take()
    yield sink.take()
    log.info("batch %s zip: %d result(s) and the manifest sent", batch_id, written)
