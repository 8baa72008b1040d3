"""What the service's prepared statements store is what SQLAlchemy (migrations, maintenance, the
model test's checker) reads, and the other way round, on both engines."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

from sqlalchemy import select, text, update

from task_orchestrator_mcp.db.engine import Database
from task_orchestrator_mcp.db.repository import task_from_row
from task_orchestrator_mcp.db.tables import tasks
from task_orchestrator_mcp.service import TaskService
from tests.support import FakeClock

DIR = "/work/storage"
# SQLAlchemy's SQLite DATETIME layout: naive UTC, always six fraction digits, so text order is time order.
SQLITE_LAYOUT = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}$")


def test_service_rows_read_back_identically_through_sqlalchemy(
    service: TaskService, database: Database, clock: FakeClock
) -> None:
    made = service.create_task(DIR, "p", tags=["a", "b"])
    clock.advance(1.5)
    service.acquire_task(DIR)
    done = service.complete_task(made.task_id, {"n": 1, "s": "ü", "list": [1, None]})
    with database.read() as conn:
        row = conn.execute(select(tasks).where(tasks.c.id == made.task_id)).one()
    assert task_from_row(row) == done
    shown = service.get_task(made.task_id)
    assert {k: v for k, v in dict(shown).items() if k != "history"} == dict(done)
    assert done.tags == ["a", "b"]
    assert done.result == {"n": 1, "s": "ü", "list": [1, None]}


def test_string_results_and_timestamps_keep_their_type_and_layout(
    service: TaskService, database: Database
) -> None:
    made = service.create_task(DIR, "p")
    service.acquire_task(DIR)
    done = service.complete_task(made.task_id, "a plain string")
    assert done.result == "a plain string"
    assert service.get_task(made.task_id).result == "a plain string"
    if database.is_sqlite:
        with database.read() as conn:
            stamps = conn.execute(
                text("SELECT created_at, started_at, completed_at FROM tasks WHERE id = :id"),
                {"id": made.task_id},
            ).one()
        assert all(SQLITE_LAYOUT.match(value) for value in stamps), stamps


def test_rows_written_through_sqlalchemy_are_claimed_and_expire_by_time(
    service: TaskService, database: Database, clock: FakeClock
) -> None:
    """A lease stored by SQLAlchemy compares correctly with the service's own timestamps."""
    made = service.create_task(DIR, "p", max_attempts=2)
    service.acquire_task(DIR, worker_id="w1", lease_seconds=60)
    expiry = clock() + timedelta(seconds=30)
    with database.write() as conn:
        conn.execute(update(tasks).where(tasks.c.id == made.task_id).values(lease_expires_at=expiry))
    clock.advance(29)
    assert service.acquire_task(DIR, worker_id="w2") is None  # not expired yet
    clock.advance(2)
    again = service.acquire_task(DIR, worker_id="w2")
    assert again is not None
    assert again.task_id == made.task_id
    assert again.started_at == clock()
    assert again.started_at is not None
    assert again.started_at.tzinfo is not None
    assert again.started_at.utcoffset() == timedelta(0)
    assert isinstance(again.created_at, datetime)
    assert again.created_at.tzinfo is not None
    assert again.created_at.astimezone(UTC) == made.created_at


def test_a_clock_in_another_time_zone_stores_the_same_instants(database: Database) -> None:
    """The service stores UTC whatever zone its clock reports in: a task made at 12:00+02:00 and one
    made at 10:30 UTC come back in that order, at those instants, in UTC."""
    plus_two = timezone(timedelta(hours=2))
    first = TaskService(database, clock=lambda: datetime(2026, 1, 1, 12, 0, tzinfo=plus_two))
    second = TaskService(database, clock=lambda: datetime(2026, 1, 1, 10, 30, tzinfo=UTC))
    early = first.create_task(DIR, "made at 10:00 UTC")
    late = second.create_task(DIR, "made at 10:30 UTC")
    assert early.created_at == datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
    assert early.created_at.utcoffset() == timedelta(0)
    page = first.list_tasks(DIR)
    assert [t.task_id for t in page.tasks] == [early.task_id, late.task_id]
    claimed = second.acquire_task(DIR, worker_id="w")
    assert claimed is not None
    assert claimed.task_id == early.task_id
    assert claimed.started_at == datetime(2026, 1, 1, 10, 30, tzinfo=UTC)
    assert first.get_task(early.task_id).created_at == datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
