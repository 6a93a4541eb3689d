"""Errors the SDK raises on purpose. Each has a stable ``code``.

Owns: turning the service's JSON error body (``{"error": {"code", "message", "field"}}``) into
an ``ApiError`` with the HTTP status and the ``Retry-After`` the API sent, and the SDK's own
failures (a wait past its deadline, a webhook that does not verify). Leaves deciding whether a
status is retried to ``bagel_client.retries``. Connection failures that outlast the retries
surface as httpx's own ``httpx.TransportError``.
"""

from __future__ import annotations

from typing import Any


class BagelError(Exception):
    """Base class of every error the SDK raises on purpose."""

    code = "client_error"


class ApiError(BagelError):
    """Raised when the API answers with a 4xx or 5xx (after the SDK's retries, if any). Carries the
    service's ``code``, ``message`` and ``field`` (the input it names, or None), the HTTP
    ``status`` and ``retry_after_s`` (the ``Retry-After`` header in seconds, or None)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None, *,
                 retry_after_s: float | None = None) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s

    @classmethod
    def from_body(cls, status: int, body: Any, text: str, retry_after_s: float | None = None) -> ApiError:
        """From a parsed response body; a body that is not the service's error shape (a proxy's
        HTML page, say) keeps its first 200 characters as the message."""
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and isinstance(error.get("code"), str):
            return cls(status, error["code"], str(error.get("message") or ""), error.get("field"),
                       retry_after_s=retry_after_s)
        return cls(status, "http_error", text[:200] or f"HTTP {status}", retry_after_s=retry_after_s)


class WaitTimeout(BagelError, TimeoutError):
    """Raised when ``wait`` reaches its ``timeout_s`` before the job or batch finished; ``last``
    is the job or batch as last read."""

    code = "wait_timeout"

    def __init__(self, message: str, last: Any) -> None:
        super().__init__(message)
        self.last = last


class ResultUnavailable(BagelError):
    """Raised when a job's result is asked for but it has none to download: the job has not
    succeeded, made text only (understand), or its stored result expired."""

    code = "result_unavailable"


class WebhookVerificationError(BagelError):
    """Raised when a received webhook's headers are missing, its timestamp is outside the
    5-minute tolerance, or no signature matches the body and the tenant's secret."""

    code = "bad_signature"
