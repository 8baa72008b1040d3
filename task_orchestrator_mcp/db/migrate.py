"""Bring the database to the head revision at start-up, safely when many servers start at once.

The fast path (schema already at head) is one small query and never imports Alembic. Otherwise the
upgrade runs under a lock: on SQLite the database's own write lock (``BEGIN IMMEDIATE``, with the
migration inside that transaction), on PostgreSQL a session-level advisory lock. Whoever gets the lock
second finds the schema at head and does nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

from loguru import logger
from sqlalchemy import Connection, text
from sqlalchemy import exc as sa_exc

from task_orchestrator_mcp.db.engine import Database, translate_errors
from task_orchestrator_mcp.errors import DatabaseError

# The newest revision in alembic/versions; a test keeps this equal to Alembic's own head.
HEAD_REVISION = "0001"
# An arbitrary constant naming our advisory lock (fits a signed 64-bit integer).
_PG_LOCK_KEY = 0x7A5C_0C4E_5A17_0001
_MISSING_TABLE = re.compile(r"no such table|does not exist|undefined table", re.I)


def script_location() -> Path:
    """The migration scripts: inside the installed package (wheel), or the checkout's ``alembic/``."""
    package = Path(__file__).resolve().parent.parent
    bundled = package / "_alembic"
    return bundled if bundled.is_dir() else package.parent / "alembic"


def current_revision(conn: Connection) -> str | None:
    """The revision stamped in the database, or None when it has no schema yet.

    Inside a transaction the probe runs in a savepoint, so a missing table does not abort it.
    """
    try:
        with conn.begin_nested() if conn.in_transaction() else conn.begin():
            value = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one_or_none()
    except sa_exc.DBAPIError as exc:
        if _MISSING_TABLE.search(str(exc.orig)):
            return None
        raise
    return None if value is None else str(value)


def ensure_schema(database: Database) -> None:
    """Upgrade to :data:`HEAD_REVISION` unless already there; errors become domain errors."""
    with translate_errors():
        with database.engine.connect() as conn:
            if current_revision(conn) == HEAD_REVISION:
                return
        if database.is_sqlite:
            _upgrade_sqlite(database)
        else:
            _upgrade_postgres(database)


def _upgrade_sqlite(database: Database) -> None:
    # BEGIN IMMEDIATE is the lock: other starting servers wait (busy_timeout), then see head.
    with database.write() as conn:
        found = current_revision(conn)
        if found != HEAD_REVISION:
            _run_alembic(conn, found)


def _upgrade_postgres(database: Database) -> None:
    with database.engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_LOCK_KEY})
        conn.commit()
        try:
            with conn.begin():
                found = current_revision(conn)
                if found != HEAD_REVISION:
                    _run_alembic(conn, found)
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_LOCK_KEY})
            conn.commit()


def _run_alembic(conn: Connection, found: str | None) -> None:
    from alembic.config import Config
    from alembic.util import CommandError

    from alembic import command

    logger.info("upgrading the database schema from {} to {}", found or "nothing", HEAD_REVISION)
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    config.attributes["connection"] = conn
    try:
        command.upgrade(config, "head")
    except CommandError as exc:
        # Typically a database migrated by a newer release: never guess, never downgrade.
        raise DatabaseError(
            f"The database schema is at revision {found!r}, which this version of task-orchestrator-mcp "
            f"(schema {HEAD_REVISION}) does not know; upgrade task-orchestrator-mcp.",
            str(exc).splitlines()[0] if str(exc) else None,
        ) from exc
