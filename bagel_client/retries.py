"""When the SDK sends a request again, and how long it waits first.

Owns: the retry policy shared by ``Client`` and ``AsyncClient``. Retried: 429 (a tenant limit:
``rate_limited``, ``too_many_waiting``), 502, 503 and 504 (the service or a proxy in front of
it is briefly unavailable), and connection errors and timeouts. Every request the SDK makes
may be sent twice safely: reads, cancels and deletes (idempotent by nature, a repeated delete
at worst a 404) and creating POSTs, which carry an ``Idempotency-Key`` that stays the same
across the retries of one call, so the service creates at most one file, adapter, job or batch
for it. The exception is ``create_session``: the API takes no ``Idempotency-Key`` there, so a
retry after an answer that was lost may leave a second, empty session behind.

A ``Retry-After`` header is honoured: the SDK waits that long (not less), unless it is longer
than ``max_retry_after_s``, in which case waiting less would only be refused again and the
``ApiError`` is raised at once, carrying ``retry_after_s``. Without the header the waits
double from ``backoff_s`` up to ``max_backoff_s``, with jitter so many clients refused
together do not come back together. Leaves sending and sleeping to the clients.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

from bagel_client.errors import ApiError

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """``max_retries`` sends after the first; waits in seconds."""

    max_retries: int = 4
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    max_retry_after_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_retries < 0 or self.backoff_s < 0 or self.max_backoff_s < 0 or self.max_retry_after_s < 0:
            raise ValueError(f"RetryPolicy: every value must be >= 0 (got {self})")

    def backoff(self, retry: int) -> float:
        """Wait before retry number ``retry`` (1 for the first) when the server named none:
        between half and all of ``backoff_s * 2**(retry - 1)``, capped at ``max_backoff_s``."""
        ceiling = min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def after_response(self, retry: int, response: httpx.Response, what: str) -> float:
        """Seconds to wait before sending again after the error ``response`` (retry number
        ``retry``); raises its ``ApiError`` when it is not retried or the retries are spent."""
        retry_after_s = retry_after(response)
        error = api_error(response, retry_after_s)
        if response.status_code not in RETRY_STATUSES or retry > self.max_retries:
            raise error
        if retry_after_s is not None and retry_after_s > self.max_retry_after_s:
            raise error
        delay = self.backoff(retry) if retry_after_s is None else retry_after_s
        log.warning("%s: %s %s, retry %d of %d in %.1f s%s", what, response.status_code, error.code, retry,
                    self.max_retries, delay, " (Retry-After)" if retry_after_s is not None else "")
        return delay

    def after_error(self, retry: int, exc: httpx.TransportError, what: str) -> float:
        """Seconds to wait before sending again after a connection error or timeout; re-raises
        ``exc`` when the retries are spent."""
        if retry > self.max_retries:
            raise exc
        delay = self.backoff(retry)
        log.warning("%s: %s: %s, retry %d of %d in %.1f s", what, type(exc).__name__, exc, retry,
                    self.max_retries, delay)
        return delay


def retry_after(response: httpx.Response) -> float | None:
    """The ``Retry-After`` header in seconds (delta-seconds or an HTTP date), or None."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def api_error(response: httpx.Response, retry_after_s: float | None = None) -> ApiError:
    """The ``ApiError`` of an error response (its body read as the service's error shape)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    return ApiError.from_body(response.status_code, body, response.text, retry_after_s)
