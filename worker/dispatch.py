"""Publishing work to the broker: one Celery message per chunk, ids only.

Owns: turning chunk ids into ``bagel_jobs.run_chunk`` messages on the ``gpu`` queue and nudging
the webhook worker, and mapping every broker failure to ``BrokerUnavailable``. Leaves the
bookkeeping (``chunks.mark_published`` before, ``unmark_published`` on a refusal) to the
caller; a message recorded but never sent is found lost and sent again by the dispatcher.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from kombu.exceptions import KombuError
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy.exc import SQLAlchemyError

from worker.celery_app import make_celery
from worker.queues import DELIVER_WEBHOOKS, GPU_QUEUE, RUN_CHUNK, WEBHOOK_QUEUE
from worker.errors import BrokerUnavailable

if TYPE_CHECKING:
    from celery import Celery

    from worker.settings import Settings

log = logging.getLogger(__name__)

# One publisher app per broker URL and process: building a Celery app costs ~10 ms and its
# connection pool is what makes repeated publishes cheap.
_apps: dict[str, Celery] = {}
_apps_lock = threading.Lock()

_RETRY_POLICY = {"max_retries": 2, "interval_start": 0.0, "interval_step": 0.2, "interval_max": 0.5}
_BROKER_ERRORS = (KombuOperationalError, KombuError, OSError, SQLAlchemyError)


def publisher(settings: Settings) -> Celery:
    """The cached Celery app used to publish to ``settings.broker_url``."""
    with _apps_lock:
        app = _apps.get(settings.broker_url)
        if app is None:
            app = make_celery(settings)
            _apps[settings.broker_url] = app
        return app


def _send(settings: Settings, name: str, args_list: list[list[str]], queue: str,
          countdown_s: float | None) -> None:
    app = publisher(settings)
    try:
        with app.producer_or_acquire() as producer:
            for args in args_list:
                app.send_task(name, args=args, queue=queue, producer=producer, countdown=countdown_s,
                              retry=True, retry_policy=_RETRY_POLICY)
    except _BROKER_ERRORS as exc:
        raise BrokerUnavailable(
            f"broker_url: cannot publish {len(args_list)} {name} message(s) to queue {queue!r}: {exc}"
        ) from exc


def publish_chunks(settings: Settings, chunk_ids: list[str], *, countdown_s: float | None = None,
                   queue: str = GPU_QUEUE) -> None:
    """Send one ``run_chunk`` message per chunk id (delayed by ``countdown_s`` for retries) to
    ``queue``: the ``gpu`` queue, or a worker's own (``queues.worker_queue``).

    Raises ``BrokerUnavailable`` when the broker cannot be reached; the jobs stay queued in the
    database and the reconciler publishes them later."""
    if not chunk_ids:
        return
    _send(settings, RUN_CHUNK, [[cid] for cid in chunk_ids], queue, countdown_s)
    log.info("published %d chunk(s)%s", len(chunk_ids),
             f" with a {countdown_s:.1f} s delay" if countdown_s else "")


def queue_length(settings: Settings, queue: str) -> int:
    """Messages waiting in ``queue`` (not counting ones a worker holds). Raises
    ``BrokerUnavailable``."""
    app = publisher(settings)
    try:
        with app.connection_for_write() as conn:
            return int(conn.default_channel.queue_declare(queue=queue, passive=False).message_count)
    except _BROKER_ERRORS as exc:
        raise BrokerUnavailable(f"broker_url: cannot read the length of queue {queue!r}: {exc}") from exc


def nudge_webhooks(settings: Settings) -> None:
    """Ask the webhook worker to deliver whatever is due now. Raises ``BrokerUnavailable``;
    callers may ignore it because the reconciler nudges on every tick."""
    _send(settings, DELIVER_WEBHOOKS, [[]], WEBHOOK_QUEUE, None)
