"""bagel_client: the Python SDK of the bagel-jobs API, sync (``Client``) and asyncio
(``AsyncClient``), needing only ``httpx`` and ``standardwebhooks`` (the ``client`` extra): no
torch, nothing of the server.

Upload pictures, submit jobs and batches (``tryon``: one product, many scenes), wait with a
progress callback, download results, list, cancel, share a batch's gallery page
(``share_batch``), and verify webhooks (``verify_webhook``). Register LoRA adapters
(``upload_adapter``) and run jobs with one (``adapter=``); read what made a job's output
(``get_provenance``) and submit it again (``rerun``). Hold a conversation in a session
(``create_session``, ``add_turn``: a job that sees every earlier turn; ``get_session``: the
transcript; ``delete_session``). Ask for the quality gate
(``quality_gate=QualityGate(threshold, max_regenerations)`` or its dict on any submission; a
succeeded job's ``quality`` is the record) and read exact-request dedupe (``Job.dedupe``,
``Job.dedupe_of``: a seeded request identical to an earlier one is answered from its result).
Every creating call carries an ``Idempotency-Key`` (a new uuid4 unless given, the same across
the SDK's retries of that call); refusals that say "later" (429, 502–504, with their
``Retry-After``) and connection errors are retried; the API's errors arrive as ``ApiError``
with the service's ``code``, ``message`` and ``field``.

Imports nothing from ``api``, ``worker`` or ``bagel`` (a test holds it to httpx, standardwebhooks
and the standard library). The ``bagel-jobs submit`` command (``bagel_client.cli``) is built on it.
"""

from bagel_client.async_client import AsyncClient
from bagel_client.client import Client
from bagel_client.errors import (
    ApiError,
    BagelError,
    ResultUnavailable,
    WaitTimeout,
    WebhookVerificationError,
)
from bagel_client.models import (
    Adapter,
    Batch,
    BatchItem,
    Delivery,
    DeliveryAttempt,
    Event,
    File,
    GenerationParams,
    Job,
    JobError,
    Progress,
    Provenance,
    Quality,
    QualityAnswer,
    QualityAttempt,
    QualityGate,
    QualityGateParams,
    Queue,
    Result,
    Session,
    SessionPart,
    Share,
    Timings,
    TranscriptItem,
    Turn,
)
from bagel_client.retries import RetryPolicy
from bagel_client.webhooks import verify_webhook

__all__ = [
    "Adapter", "ApiError", "AsyncClient", "BagelError", "Batch", "BatchItem", "Client", "Delivery", "DeliveryAttempt",
    "Event", "File", "GenerationParams", "Job", "JobError", "Progress", "Provenance", "Quality", "QualityAnswer",
    "QualityAttempt", "QualityGate", "QualityGateParams", "Queue", "Result", "ResultUnavailable", "RetryPolicy",
    "Session", "SessionPart", "Share", "Timings", "TranscriptItem", "Turn", "WaitTimeout", "WebhookVerificationError",
    "verify_webhook",
]
