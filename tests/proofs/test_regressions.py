"""Regression tests for defects the proofs (model and fuzz) found, on both engines."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from task_orchestrator_mcp.db.engine import Database
from task_orchestrator_mcp.errors import InvalidInput, NotLeaseHolder
from task_orchestrator_mcp.models import Task
from task_orchestrator_mcp.service import MAX_DIRECTORY_BYTES, TaskService
from tests.proofs.support import incompressible
from tests.support import FakeClock


def _cursor(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "raw",
    [
        # A JSON escape that decodes to a lone surrogate: no driver can encode it (was an internal error).
        b'["2026-01-01T00:00:00+00:00","\\ud800"]',
        # Offsets that push the instant past datetime.min / datetime.max (was an OverflowError).
        b'["0001-01-01T00:00:00+05:00","x"]',
        b'["9999-12-31T23:59:59-05:00","x"]',
        # Naive instants and ids that are not strings or too long stay refused.
        b'["2026-01-01T00:00:00","x"]',
        b'["2026-01-01T00:00:00+00:00",5]',
        b'["2026-01-01T00:00:00+00:00","' + b"y" * 300 + b'"]',
    ],
)
def test_forged_cursor_is_refused_clearly(service: TaskService, raw: bytes) -> None:
    with pytest.raises(InvalidInput, match="cursor is not valid"):
        service.list_tasks(cursor=_cursor(raw))


def test_directory_too_long_for_the_claim_index_is_refused(service: TaskService) -> None:
    # 4,000 scrambled CJK characters (12 kB) defeat PostgreSQL's index compression: the insert used to
    # fail inside the database with "index row size exceeds maximum", reported as "unavailable, retry".
    with pytest.raises(InvalidInput, match="work_directory is 12001 bytes"):
        service.create_task("/" + incompressible(4000), "p")
    with pytest.raises(InvalidInput, match="work_directory"):
        service.acquire_task("/" + "a" * MAX_DIRECTORY_BYTES)


def test_longest_allowed_directory_is_stored_and_claimed(service: TaskService) -> None:
    # 1 + 682 * 3 = 2,047 bytes of incompressible UTF-8: the worst case that must still fit the index.
    directory = "/" + incompressible(682)
    assert len(directory.encode()) <= MAX_DIRECTORY_BYTES
    created = service.create_task(directory, "p")
    claimed = service.acquire_task(directory, "w")
    assert claimed is not None
    assert claimed.task_id == created.task_id


@pytest.mark.parametrize("engine_name", [pytest.param("postgres", marks=pytest.mark.postgres)])
def test_creates_take_turns_so_a_cursor_never_passes_a_task_committed_later(database: Database) -> None:
    """PostgreSQL: a create read its clock, another read a later one and committed first; the first
    then committed behind the cursor of a planner paging meanwhile, and that planner never saw it.
    Now a create waits for one in flight, so creation times follow commit order."""
    clock_read = threading.Event()
    release = threading.Event()

    def held_clock() -> datetime:  # reads the time, then stays in flight until released
        now = datetime.now(UTC)
        clock_read.set()
        release.wait(timeout=30)
        return now

    slow = threading.Thread(target=TaskService(database, clock=held_clock).create_task, args=("/p", "slow"))
    fast = threading.Thread(target=TaskService(database).create_task, args=("/p", "fast"))
    slow.start()
    assert clock_read.wait(timeout=30)
    fast.start()
    deadline = time.monotonic() + 30
    while fast.is_alive() and not _advisory_lock_waiters(database) and time.monotonic() < deadline:
        time.sleep(0.01)
    committed_meanwhile = not fast.is_alive()
    release.set()
    slow.join(timeout=30)
    fast.join(timeout=30)
    assert not committed_meanwhile, "a create committed while one with an earlier clock reading was in flight"
    tasks = TaskService(database).list_tasks("/p").tasks
    assert [task.prompt for task in tasks] == ["slow", "fast"]
    assert tasks[0].created_at < tasks[1].created_at


@pytest.mark.parametrize(
    "step_back", [timedelta(seconds=1), timedelta(hours=1)], ids=["same tick", "stepped back"]
)
def test_a_create_that_reads_the_same_or_an_earlier_time_still_comes_after_the_cursor(
    database: Database, step_back: timedelta
) -> None:
    """Creates that read the clock tick of an earlier create (or a clock stepped back since, or on
    PostgreSQL a machine whose clock runs behind) used to sort by their random ids or before it, so
    they could land behind a cursor handed out after it and never be listed. Creation times now
    strictly increase in commit order."""
    clock = FakeClock()
    service = TaskService(database, clock=clock)
    first = service.create_task("/p", "first")
    clock.advance(1)
    second = service.create_task("/p", "second")
    page = service.list_tasks("/p", limit=1)
    assert [task.task_id for task in page.tasks] == [first.task_id]
    assert page.next_cursor is not None
    clock.now -= step_back  # "same tick": back to the first create's reading
    later = [service.create_task("/p", f"later {i}").task_id for i in range(4)]
    rest = service.list_tasks(cursor=page.next_cursor).tasks
    assert [task.task_id for task in rest] == [second.task_id, *later]
    times = [task.created_at for task in rest]
    assert times == sorted(set(times)), "creation times must strictly increase"
    assert times[1] == second.created_at + timedelta(microseconds=1)
    assert all(task.updated_at == task.created_at for task in rest)


def _advisory_lock_waiters(database: Database) -> int:
    return _lock_waiters(database, "advisory")


def _lock_waiters(database: Database, kind: str | None = None) -> int:
    """Sessions of this test's database waiting for a lock (of ``kind``, if given): pg_locks covers
    the whole cluster, and a waiter elsewhere must not end a test's wait early."""
    with database.read() as conn:
        waiting: int = conn.execute(
            text(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE NOT l.granted AND a.datname = current_database() "
                "AND (CAST(:kind AS text) IS NULL OR l.locktype = :kind)"
            ),
            {"kind": kind},
        ).scalar_one()
    return waiting


@pytest.mark.parametrize("engine_name", [pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_heartbeat_that_waited_for_the_row_lock_extends_the_lease_from_after_the_wait(
    database: Database,
) -> None:
    """PostgreSQL has no write lock: the clock used to be read before the row lock was waited for,
    so a heartbeat that waited lost that wait from its lease (and a cancel could date itself before
    the change it waited behind)."""
    clock = FakeClock()
    service = TaskService(database, clock=clock, worker_id="w")
    made = service.create_task("/p", "x")
    assert service.acquire_task("/p", lease_seconds=60) is not None
    result: list[Task] = []
    with database.write() as other:
        other.execute(text("SELECT id FROM tasks WHERE id = :id FOR UPDATE"), {"id": made.task_id})
        beat = threading.Thread(target=lambda: result.append(service.heartbeat_task(made.task_id)))
        beat.start()
        deadline = time.monotonic() + 30
        while not _lock_waiters(database) and time.monotonic() < deadline:
            time.sleep(0.01)
        clock.advance(30)  # the time spent waiting for the row
    beat.join(timeout=30)
    assert result[0].lease_expires_at == clock.now + timedelta(seconds=60)


def test_a_cursor_with_the_longest_non_ascii_filters_is_taken_back(
    service: TaskService, clock: FakeClock
) -> None:
    """32 tags of 64 CJK characters and a long directory: the server must accept the cursor it issued
    (ASCII-escaped JSON made it 24,647 characters, past the length it accepted)."""
    directory = "/" + "目" * 600  # 1,801 bytes of UTF-8
    tags = [f"{i:02d}" + "标" * 62 for i in range(32)]
    for prompt in ("first", "second"):
        service.create_task(directory, prompt, tags=tags)
        clock.advance(1)
    first = service.list_tasks(directory, tags=tags, limit=1)
    assert first.next_cursor is not None
    second = service.list_tasks(cursor=first.next_cursor, limit=1)
    assert [task.prompt for task in second.tasks] == ["second"]


def test_a_refused_heartbeat_or_fail_does_not_hide_a_pending_task_from_claims(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stale worker's heartbeat on a task that went back to pending used to lock the row while it was
    refused; on PostgreSQL a claim meanwhile skipped it (SKIP LOCKED) and answered that nothing was
    pending. The refusal is slowed here, inside its transaction, so that the claim lands in it."""
    import task_orchestrator_mcp.service as service_module

    service = TaskService(database, worker_id="fresh")
    stale = TaskService(database, worker_id="stale")
    refusing = threading.Event()
    real_refusal = service_module._refusal

    def slow_refusal(*args: Any, **kwargs: Any) -> Exception:
        refusing.set()
        time.sleep(0.5)  # still in the refused call's transaction
        return real_refusal(*args, **kwargs)

    monkeypatch.setattr(service_module, "_refusal", slow_refusal)
    for refused_call in (stale.heartbeat_task, stale.fail_task):
        task = service.create_task("/work/refused", "p")
        refusing.clear()
        args = (task.task_id,) if refused_call == stale.heartbeat_task else (task.task_id, "gave up")
        caller = threading.Thread(target=_refused, args=(refused_call, *args))
        caller.start()
        assert refusing.wait(10)
        claimed = service.acquire_task("/work/refused")
        caller.join()
        assert claimed is not None
        assert claimed.task_id == task.task_id
        service.complete_task(task.task_id, "done")


def _refused(call: Callable[..., object], *args: object) -> None:
    with pytest.raises(NotLeaseHolder):
        call(*args)
