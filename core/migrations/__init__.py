"""Alembic migrations of the job store (run on start by ``core.db.migrate``; schema in ``core.schema``)."""
