"""Queue and task names shared by the Celery app, the tasks, publishing and execution.

Owns: the names only (and a GPU worker's own queue name), so that ``celery_app``, ``tasks``, ``dispatch`` and ``execution`` import
this module rather than each other.
"""

GPU_QUEUE = "gpu"
WEBHOOK_QUEUE = "webhooks"
QUEUES = (GPU_QUEUE, WEBHOOK_QUEUE)

RUN_CHUNK = "bagel_jobs.run_chunk"
DELIVER_WEBHOOKS = "bagel_jobs.deliver_webhooks"


def worker_queue(worker_id: str) -> str:
    """A GPU worker's own queue, beside ``gpu``: the turns of sessions whose context it holds."""
    return f"{GPU_QUEUE}.{worker_id}"
