"""worker: the job system of bagel-jobs — settings, database state, storage, the Celery app and
tasks (GPU chunks, webhook delivery, reconciler) and the ``bagel-jobs`` CLI.

Only ``worker.gpu`` imports ``bagel`` (and torch); everything else here is importable by the API.
"""
