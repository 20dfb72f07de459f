"""The job store's database: engines for SQLite and PostgreSQL, the migrations run on start, row helpers.
Torch-free.

``migrate(engine)`` is ``alembic upgrade head`` run from code (no alembic.ini needed): every process that
opens the store calls it, and a database at the newest revision costs one query. Processes starting
together (an API and its workers) take a lock first, so exactly one of them migrates and the others
find the work done: PostgreSQL's transaction-scoped advisory lock, SQLite's write lock (``BEGIN
IMMEDIATE``). Both databases run DDL inside the transaction, so a migration that fails leaves nothing
half done.

A store made before migrations existed (tables, no ``alembic_version``) is adopted by revision 0001,
which creates only what is missing: its rows stay as they are.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

MIGRATIONS = Path(__file__).resolve().with_name("migrations")
# Any fixed 64-bit number: the key of the advisory lock that serialises migrations on PostgreSQL.
_PG_LOCK_KEY = 0x1DD_5707E


def normalise_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (psycopg2 is not a dependency)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        db = sa.engine.make_url(url).database
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL: readers (the API) never block the writer (the worker); busy_timeout: writers queue
            # up instead of failing with "database is locked".
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    # pre_ping: a PostgreSQL that restarted left dead connections in the pool; they are replaced, not used.
    return sa.create_engine(url, pool_pre_ping=True)


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration for ``core/migrations``, on ``connection`` if given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


@cache
def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(conn: Connection) -> str | None:
    """The database's revision; None for an empty database or one made before migrations existed."""
    return MigrationContext.configure(conn, opts={"transactional_ddl": True}).get_current_revision()


def migrate(engine: Engine) -> None:
    """Bring the database to the newest schema (``alembic upgrade head``)."""
    with engine.connect() as conn:
        if current_revision(conn) == head_revision():
            return
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        elif conn.dialect.name == "sqlite":
            # pysqlite opens no transaction before DDL by itself; this one takes the write lock at once.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        command.upgrade(alembic_config(conn), "head")  # a no-op when another process just did it
        conn.commit()


def new_id(prefix: str) -> str:
    """A fresh record id, ``<prefix>_<16 hex digits>``."""
    return f"{prefix}_{secrets.token_hex(8)}"


def utcnow() -> datetime:
    # Naive UTC everywhere: SQLite has no time zones, and naive values compare the same on both databases.
    return datetime.now(UTC).replace(tzinfo=None)


def plain(values: Mapping[str, Any]) -> dict[str, Any]:
    """A row (``row._mapping``) or inserted values as a JSON-ready dict: timestamps as ISO 8601 in UTC."""
    return {k: v.replace(tzinfo=UTC).isoformat() if isinstance(v, datetime) else v for k, v in values.items()}
