"""Errors of the job service. Each has a stable ``code`` that goes on the job row and into the
API's JSON error body, and an optional ``field`` naming the offending input.

Owns: the error taxonomy (permanent input errors, not-found/auth/conflict, tenant limits,
transient infrastructure errors, GPU errors). Leaves the mapping to HTTP status codes to ``api/errors.py`` and the
retry policy to the worker tasks. Messages name the field, the value and the limit.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class of every error the service raises on purpose."""

    code = "service_error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


# Permanent: the client can fix these; a job failing with one is never retried.

class InvalidInput(ServiceError):
    """Raised when a request is invalid in a way the client can fix."""

    code = "invalid_input"


class InvalidParameter(InvalidInput):
    """Raised when a job parameter (task, prompt, size, hyper-parameter, metadata) is out of
    range or unknown; the message names the parameter, the value and the allowed range."""

    code = "invalid_parameter"


class InvalidImage(InvalidInput):
    """Raised when uploaded bytes are not a decodable image (garbage, truncated, corrupt)."""

    code = "invalid_image"


class UnsupportedImageFormat(InvalidInput):
    """Raised when an uploaded image is a format other than PNG, JPEG or WebP."""

    code = "unsupported_image_format"


class PayloadTooLarge(InvalidInput):
    """Raised when an upload exceeds the byte limit (``max_upload_bytes``)."""

    code = "payload_too_large"


class ImageTooLarge(InvalidInput):
    """Raised when an image's header declares more pixels or a longer side than allowed
    (checked before decoding, so decompression bombs are refused cheaply)."""

    code = "image_too_large"


class BatchTooLarge(InvalidInput):
    """Raised when a batch has more items than ``max_batch_items``."""

    code = "batch_too_large"


class UnknownFile(InvalidInput):
    """Raised when a job refers to a file id the tenant does not own (or that does not exist)."""

    code = "unknown_file"


class UnknownAdapter(InvalidInput):
    """A job names an adapter the tenant does not have."""

    code = "unknown_adapter"


class InvalidAdapter(InvalidInput):
    """An uploaded adapter does not fit the base model (a module it names, a shape, its rank) or
    is not a PEFT LoRA adapter we can apply; the message names the module or key."""

    code = "invalid_adapter"


class ContextTooLong(InvalidInput):
    """A session turn whose context, its output included, would exceed
    ``session_max_context_tokens``; the message names the count and the limit."""

    code = "context_too_long"


class AdapterInUse(ServiceError):
    """An adapter that queued or running jobs still need cannot be deleted."""

    code = "adapter_in_use"


class InvalidWebhookUrl(InvalidInput):
    """Raised when a webhook URL has a bad scheme, embedded credentials, or targets a private,
    loopback or link-local address while those are not allowed."""

    code = "invalid_webhook_url"


class WebhookAddressNotAllowed(InvalidWebhookUrl):
    """Raised at delivery when a webhook URL's host is, or resolves to, a non-public address
    (private, loopback, link-local, shared, reserved, multicast) while those are not allowed;
    the attempt fails for good (no retry: the answer names where the host points, a setting of
    the client's, not a passing fault)."""

    code = "address_not_allowed"


# Addressing, auth and conflicts.

class NotFound(ServiceError):
    """Raised when an id does not exist or belongs to another tenant (indistinguishable)."""

    code = "not_found"


class Unauthorized(ServiceError):
    """Raised when the ``Authorization: Bearer`` key is missing, malformed, unknown or revoked."""

    code = "unauthorized"


class IdempotencyConflict(ServiceError):
    """Raised when an ``Idempotency-Key`` is reused with a different request body or route."""

    code = "idempotency_conflict"


class DeliveryPending(ServiceError):
    """Raised when a replay is asked of a webhook delivery that is still pending: its next
    attempt is already planned (or under way), so a replay would send it twice."""

    code = "delivery_pending"


class ProvenanceNotRecorded(ServiceError):
    """Raised when a job's provenance is asked for before a GPU worker recorded it: the job is
    still waiting or running, or it ended without running on the engine (canceled, expired,
    or failed before it)."""

    code = "provenance_not_recorded"


class ObjectNotFound(ServiceError):
    """Raised when a storage key does not exist."""

    code = "object_not_found"


class SignatureInvalid(ServiceError):
    """Raised when a local-storage download URL's signature is wrong or has expired."""

    code = "signature_invalid"


class ShareLinkInvalid(SignatureInvalid):
    """Raised when a batch gallery's share link is missing its token, or the token is malformed,
    altered, or signed for another batch or with another key."""

    code = "share_link_invalid"


class ShareLinkExpired(SignatureInvalid):
    """Raised when a batch gallery's share link is genuine but its expiry has passed."""

    code = "share_link_expired"


class SettingsError(ServiceError):
    """Raised at start-up when a setting is invalid; the message names the variable."""

    code = "invalid_settings"


# Tenant limits (``worker.limits``): a submission refused before anything is stored.

class LimitExceeded(ServiceError):
    """Raised when a submission would break one of the tenant's limits; ``retry_after_s`` says
    when trying again may succeed (None: not before the limit or the usage changes)."""

    code = "limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: int | None = None, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.retry_after_s = retry_after_s


class RateLimited(LimitExceeded):
    """Raised when the tenant already made ``requests_per_minute`` submissions in the last 60 s."""

    code = "rate_limited"


class TooManyWaiting(LimitExceeded):
    """Raised when the tenant's queued jobs plus the new ones would exceed ``max_waiting_jobs``."""

    code = "too_many_waiting"


class GpuBudgetExhausted(LimitExceeded):
    """Raised when the GPU-seconds of the tenant's jobs finished this UTC calendar month reach
    ``monthly_gpu_seconds``; the message says when the month resets."""

    code = "gpu_budget_exhausted"


# Transient: infrastructure hiccups, retried with capped backoff.

class TransientError(ServiceError):
    """Raised when a dependency is temporarily unreachable; the operation may be retried."""

    code = "transient"


class BrokerUnavailable(TransientError):
    """Raised when the Celery broker cannot be reached to publish a chunk (the jobs stay
    committed as ``queued`` and the reconciler publishes them later)."""

    code = "broker_unavailable"


class StorageUnavailable(TransientError):
    """Raised when object storage cannot be reached or refuses a request (e.g. credentials)."""

    code = "storage_unavailable"


class DatabaseUnavailable(TransientError):
    """Raised when the database cannot be reached."""

    code = "database_unavailable"


class WebhookDnsFailure(TransientError):
    """Raised at delivery when a webhook URL's host does not resolve right now (no answer, a
    DNS timeout, no such name); the attempt is retried with backoff."""

    code = "dns_error"


# GPU: what the worker's device reports.

class GpuOutOfMemory(ServiceError):
    """Raised (recorded on the job) when one job does not fit in GPU memory on its own: over the
    memory budget, or the device ran out of memory running it alone. Permanent: the same job on
    the same GPU would fail again, so it is never retried."""

    code = "gpu_out_of_memory"


class DeviceFailure(ServiceError):
    """Raised when the GPU reports an error other than out of memory (a device-side assert, an
    illegal memory access): the CUDA context is unusable, so the worker gives its chunk back
    and exits for its supervisor to start a clean process."""

    code = "gpu_device_error"
