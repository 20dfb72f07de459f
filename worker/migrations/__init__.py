"""Alembic migrations of the job store (run on start by ``worker.db.migrate``; schema in ``worker.schema``)."""
