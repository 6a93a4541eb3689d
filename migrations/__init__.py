"""Alembic migrations of the job service's database: the only way the schema changes.

Configured in code by ``worker.db.alembic_config(settings)``; ``bagel-jobs db upgrade`` runs them.
"""
