"""Alembic's environment for the job store.

At run time ``core.db.migrate`` passes the connection to migrate (and holds the lock on it). From the
command line, to write a new revision after changing ``core/schema.py``::

    LDD_STORE_URL=sqlite:///scratch.db alembic -c core/migrations/alembic.ini upgrade head
    LDD_STORE_URL=sqlite:///scratch.db alembic -c core/migrations/alembic.ini revision --autogenerate -m "..."

the store named by the ``LDD_*`` settings is used.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from core.db import make_engine
from core.schema import metadata
from core.settings import Settings


def run(connection: Connection, transactional_ddl: bool | None = None) -> None:
    # render_as_batch: SQLite alters a table by copying it; later revisions then work on both databases.
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                      transactional_ddl=transactional_ddl)  # fmt: skip
    with context.begin_transaction():
        context.run_migrations()


given = context.config.attributes.get("connection")
if given is not None:
    run(given, transactional_ddl=True)  # core.db.migrate holds a transaction open on both databases
else:
    engine = make_engine(Settings().store_url)
    with engine.connect() as conn:
        run(conn)
        conn.commit()
    engine.dispose()
