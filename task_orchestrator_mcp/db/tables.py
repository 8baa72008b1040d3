"""The schema as SQLAlchemy Core tables. Alembic's env.py imports only this module."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
)
from sqlalchemy.types import TypeDecorator, TypeEngine

# Deterministic constraint names, so migrations (and SQLite batch mode) can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in, timezone-aware UTC out, on every engine.

    SQLite has no time zone type: values are stored as naive UTC text, which sorts and compares correctly.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JSONValue(TypeDecorator[Any]):
    """JSONB on PostgreSQL (compact, comparable); JSON text elsewhere.

    A decorator rather than ``JSON().with_variant(JSONB(), ...)`` so the PostgreSQL dialect is imported
    only when PostgreSQL is used: it costs SQLite users about 30 ms of every server start.
    """

    # Python None is SQL NULL on both paths (SQLAlchemy's and the repository's prepared statements).
    impl = JSON(none_as_null=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import JSONB

            return dialect.type_descriptor(JSONB(none_as_null=True))
        return dialect.type_descriptor(JSON(none_as_null=True))


# Integer ids: BIGINT identity on PostgreSQL, INTEGER (the rowid alias) on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")

tasks = Table(
    "tasks",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("work_directory", Text, nullable=False),
    Column("prompt", Text, nullable=False),
    # 0 = high, 1 = medium, 2 = low: ascending order is claim order.
    Column("priority", SmallInteger, nullable=False),
    Column("tags", JSONValue, nullable=False),
    Column("status", String(16), nullable=False),
    Column("worker_id", String(256), nullable=True),
    Column("attempts", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("result", JSONValue, nullable=True),
    Column("error", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime, nullable=True),
    Column("completed_at", UTCDateTime, nullable=True),
    Column("lease_expires_at", UTCDateTime, nullable=True),
    # The lease length of the last claim or heartbeat: a heartbeat without one extends by as much.
    Column("lease_seconds", Integer, nullable=True),
    # The claim: first pending row of a directory in (priority, age) order is one index seek.
    Index("ix_tasks_claim", "work_directory", "status", "priority", "created_at", "id"),
    # Lease recovery: expired in-progress rows, oldest lease first.
    Index("ix_tasks_status_lease", "status", "lease_expires_at"),
    # Listing pages in creation order, unfiltered or by status.
    Index("ix_tasks_created", "created_at", "id"),
    Index("ix_tasks_status_created", "status", "created_at", "id"),
    Index("ix_tasks_directory_created", "work_directory", "created_at", "id"),
)

# One row per tag, so a tag filter is an index lookup rather than a scan of JSON.
task_tags = Table(
    "task_tags",
    metadata,
    Column("task_id", String(32), ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True),
    Column("tag", String(64), primary_key=True),
    Index("ix_task_tags_tag_task_id", "tag", "task_id"),
)

task_history = Table(
    "task_history",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("task_id", String(32), ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False),
    Column("from_status", String(16), nullable=True),
    Column("to_status", String(16), nullable=False),
    Column("worker_id", String(256), nullable=True),
    Column("at", UTCDateTime, nullable=False),
    Column("details", JSONValue, nullable=True),
    Index("ix_task_history_task_id_id", "task_id", "id"),
)
