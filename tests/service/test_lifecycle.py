"""The queue's rules, on the real service and a real database (both engines)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
from pydantic import TypeAdapter

from task_orchestrator_mcp.db.engine import Database
from task_orchestrator_mcp.db.repository import TaskRepository
from task_orchestrator_mcp.errors import InvalidInput, InvalidTransition, NotLeaseHolder, TaskNotFound
from task_orchestrator_mcp.models import Priority, TaskStatus
from task_orchestrator_mcp.service import MAX_JSON_DEPTH, MAX_TAG_CHARS, TaskService
from tests.support import FakeClock

DIR = "/work/project"


def test_create_returns_pending_task_with_normalised_directory(service: TaskService) -> None:
    task = service.create_task("/work/./project/", "write the tests", "high", ["py", "py", "ci"], 5)
    assert task.work_directory == DIR
    assert task.status is TaskStatus.PENDING
    assert task.priority is Priority.HIGH
    assert task.tags == ["py", "ci"]
    assert (task.attempts, task.max_attempts) == (0, 5)
    assert task.created_at.tzinfo is not None
    assert task.worker_id is None


def test_acquire_takes_highest_priority_then_oldest(service: TaskService, clock: FakeClock) -> None:
    low = service.create_task(DIR, "low", "low")
    clock.advance(1)
    med_old = service.create_task(DIR, "medium old", "medium")
    clock.advance(1)
    high = service.create_task(DIR, "high", "high")
    clock.advance(1)
    med_new = service.create_task(DIR, "medium new", "medium")
    service.create_task("/elsewhere", "other directory", "high")
    order = [service.acquire_task(DIR, "w") for _ in range(5)]
    assert [t.task_id if t else None for t in order] == [
        high.task_id,
        med_old.task_id,
        med_new.task_id,
        low.task_id,
        None,
    ]


def test_acquire_sets_holder_lease_and_attempt(service: TaskService, clock: FakeClock) -> None:
    service.create_task(DIR, "p")
    task = service.acquire_task(DIR, "w1", lease_seconds=60)
    assert task is not None
    assert task.status is TaskStatus.IN_PROGRESS
    assert task.worker_id == "w1"
    assert task.attempts == 1
    assert task.started_at == clock.now
    assert task.lease_expires_at is not None
    assert (task.lease_expires_at - clock.now).total_seconds() == 60


def test_default_worker_id_is_the_services(service: TaskService) -> None:
    service.create_task(DIR, "p")
    task = service.acquire_task(DIR)
    assert task is not None
    assert task.worker_id == "worker-default"
    done = service.complete_task(task.task_id, "ok")
    assert done.status is TaskStatus.COMPLETED


@pytest.mark.parametrize("worker_id", ["", "  ", "w" * 257, "a\x00b"])
def test_a_configured_worker_id_meets_the_rules_of_an_agents_own(database: Database, worker_id: str) -> None:
    """Unchecked, a bad default id reached the database on every acquire (PostgreSQL refused it there:
    "The database rejected the request")."""
    with pytest.raises(InvalidInput, match="worker_id"):
        TaskService(database, worker_id=worker_id)


def test_complete_stores_result_and_history(service: TaskService, clock: FakeClock) -> None:
    created = service.create_task(DIR, "p")
    service.acquire_task(DIR, "w1")
    clock.advance(5)
    done = service.complete_task(created.task_id, {"files": ["a.py"], "n": 2, "nested": {"ok": True}}, "w1")
    assert done.status is TaskStatus.COMPLETED
    assert done.result == {"files": ["a.py"], "n": 2, "nested": {"ok": True}}
    assert done.completed_at == clock.now
    assert done.lease_expires_at is None
    full = service.get_task(created.task_id)
    assert [(h.from_status, h.to_status, h.worker_id) for h in full.history] == [
        (None, TaskStatus.PENDING, None),
        (TaskStatus.PENDING, TaskStatus.IN_PROGRESS, "w1"),
        (TaskStatus.IN_PROGRESS, TaskStatus.COMPLETED, "w1"),
    ]


def test_acquire_and_complete_return_the_task_as_stored(service: TaskService, clock: FakeClock) -> None:
    # What the worker is handed is what is stored: every field equals what get_task reads after,
    # on a retried task (attempts and error carried), down to the JSON (PostgreSQL's key order).
    created = service.create_task(DIR, "do it\nwell", "high", ["a", "b"], 3)
    service.acquire_task(DIR, "w1")
    service.fail_task(created.task_id, "flaky", "w1")
    clock.advance(1.5)
    claimed = service.acquire_task(DIR, "w2", lease_seconds=120)
    assert claimed is not None
    stored = service.get_task(created.task_id)
    assert claimed.model_dump() == stored.model_dump(exclude={"history"})
    assert (claimed.attempts, claimed.error, claimed.tags) == (2, "flaky", ["a", "b"])
    clock.advance(0.25)
    done = service.complete_task(created.task_id, {"z": 1, "a": [1.5, None, "x"]}, "w2")
    stored = service.get_task(created.task_id)
    assert done.model_dump() == stored.model_dump(exclude={"history"})
    assert done.model_dump_json() == stored.model_dump_json(exclude={"history"})


def test_string_result_round_trips(service: TaskService) -> None:
    created = service.create_task(DIR, "p")
    service.acquire_task(DIR, "w1")
    service.complete_task(created.task_id, "all done ✓", "w1")
    assert service.get_task(created.task_id).result == "all done ✓"


def test_only_the_holder_may_heartbeat_complete_or_fail(service: TaskService) -> None:
    created = service.create_task(DIR, "p")
    service.acquire_task(DIR, "w1")
    with pytest.raises(NotLeaseHolder, match="held by worker 'w1'"):
        service.complete_task(created.task_id, "x", "w2")
    with pytest.raises(NotLeaseHolder):
        service.heartbeat_task(created.task_id, "w2")
    with pytest.raises(NotLeaseHolder):
        service.fail_task(created.task_id, "boom", "w2")
    assert service.get_task(created.task_id).worker_id == "w1"


def test_completing_twice_or_completing_pending_is_refused(service: TaskService) -> None:
    created = service.create_task(DIR, "p")
    with pytest.raises(NotLeaseHolder, match="pending"):
        service.complete_task(created.task_id, "x", "w1")
    service.acquire_task(DIR, "w1")
    service.complete_task(created.task_id, "first", "w1")
    with pytest.raises(InvalidTransition, match="already completed"):
        service.complete_task(created.task_id, "second", "w1")
    assert service.get_task(created.task_id).result == "first"


def test_heartbeat_extends_lease_from_now(service: TaskService, clock: FakeClock) -> None:
    created = service.create_task(DIR, "p")
    service.acquire_task(DIR, "w1", lease_seconds=30)
    clock.advance(20)
    task = service.heartbeat_task(created.task_id, "w1")
    assert task.lease_expires_at is not None
    assert (task.lease_expires_at - clock.now).total_seconds() == 30  # the last lease length
    task = service.heartbeat_task(created.task_id, "w1", lease_seconds=120)
    assert task.lease_expires_at is not None
    assert (task.lease_expires_at - clock.now).total_seconds() == 120


def test_expired_lease_is_reclaimed_and_old_holder_fenced(service: TaskService, clock: FakeClock) -> None:
    created = service.create_task(DIR, "p")
    service.acquire_task(DIR, "w1", lease_seconds=10)
    clock.advance(5)
    assert service.acquire_task(DIR, "w2") is None  # lease still valid: not available
    clock.advance(6)
    again = service.acquire_task(DIR, "w2", lease_seconds=10)
    assert again is not None
    assert again.task_id == created.task_id
    assert (again.worker_id, again.attempts) == ("w2", 2)
    with pytest.raises(NotLeaseHolder, match="held by worker 'w2'"):
        service.complete_task(created.task_id, "stale work", "w1")
    with pytest.raises(NotLeaseHolder):
        service.heartbeat_task(created.task_id, "w1")
    done = service.complete_task(created.task_id, "fresh work", "w2")
    assert done.result == "fresh work"
    history = service.get_task(created.task_id).history
    assert [(h.from_status, h.to_status, h.worker_id) for h in history] == [
        (None, TaskStatus.PENDING, None),
        (TaskStatus.PENDING, TaskStatus.IN_PROGRESS, "w1"),
        (TaskStatus.IN_PROGRESS, TaskStatus.PENDING, "w1"),
        (TaskStatus.PENDING, TaskStatus.IN_PROGRESS, "w2"),
        (TaskStatus.IN_PROGRESS, TaskStatus.COMPLETED, "w2"),
    ]
    assert history[2].details is not None
    assert history[2].details["reason"] == "lease_expired"
    # Written as the tools write every time: the same instant, the same text as the task's field.
    expired_at = TypeAdapter(datetime).dump_python(clock.now - timedelta(seconds=1), mode="json")
    assert history[2].details["lease_expired_at"] == expired_at
    assert expired_at.endswith("Z")


def test_holder_with_expired_but_untaken_lease_may_still_finish(
    service: TaskService, clock: FakeClock
) -> None:
    created = service.create_task(DIR, "p")
    service.acquire_task(DIR, "w1", lease_seconds=10)
    clock.advance(60)
    assert (
        service.complete_task(created.task_id, "late but nobody else took it", "w1").status
        is TaskStatus.COMPLETED
    )


def test_acquire_recovers_a_lease_the_moment_it_ends_though_checks_are_skipped(
    database: Database, clock: FakeClock
) -> None:
    """Acquire skips the look for expired leases while none can have ended; two services (as two
    processes) on one database and clock show that a lease still ends exactly on time, whether it
    was running at the last check or granted by the other process after it."""
    first, second = (TaskService(database, clock=clock, worker_id=name) for name in ("first", "second"))
    running = first.create_task(DIR, "running at the check")
    assert second.acquire_task(DIR, lease_seconds=1) is not None  # ends at 12:00:01
    clock.advance(0.5)
    assert first.acquire_task("/elsewhere") is None  # checks now: the earliest lease ends at 12:00:01
    clock.advance(0.6)
    again = first.acquire_task(DIR)
    assert again is not None
    assert (again.task_id, again.worker_id, again.attempts) == (running.task_id, "first", 2)

    later = first.create_task(DIR, "granted after the check")
    assert first.acquire_task("/elsewhere") is None  # checks at 12:00:01.1: no lease ends before 12:00:02.1
    clock.advance(0.25)
    assert second.acquire_task(DIR, lease_seconds=1) is not None  # ends at 12:00:02.35
    clock.advance(1.2)
    taken = first.acquire_task(DIR)
    assert taken is not None
    assert (taken.task_id, taken.worker_id, taken.attempts) == (later.task_id, "first", 2)


def test_acquire_skips_the_look_only_while_no_lease_can_end(
    database: Database, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The look for expired leases runs once per window, not per acquire; again once the window is
    over, and again when the clock goes back before the check it relies on."""
    looks: list[object] = []
    original = TaskRepository.earliest_lease_expiry

    def counted(self: TaskRepository) -> object:
        looks.append(None)
        return original(self)

    monkeypatch.setattr(TaskRepository, "earliest_lease_expiry", counted)
    service = TaskService(database, clock=clock, worker_id="w")
    for _ in range(3):
        assert service.acquire_task(DIR) is None
    assert len(looks) == 1
    clock.advance(1)  # the window (at most MIN_LEASE_SECONDS) is over
    assert service.acquire_task(DIR) is None
    assert len(looks) == 2
    clock.advance(-5)
    assert service.acquire_task(DIR) is None
    assert len(looks) == 3


def test_service_refuses_a_default_lease_below_the_minimum(database: Database) -> None:
    with pytest.raises(InvalidInput, match="default_lease_seconds"):
        TaskService(database, default_lease_seconds=0)


def test_lease_expiry_after_last_attempt_fails_the_task(service: TaskService, clock: FakeClock) -> None:
    created = service.create_task(DIR, "p", max_attempts=2)
    for worker in ("w1", "w2"):
        assert service.acquire_task(DIR, worker, lease_seconds=10) is not None
        clock.advance(11)
    assert service.acquire_task(DIR, "w3") is None
    task = service.get_task(created.task_id)
    assert task.status is TaskStatus.FAILED
    assert task.attempts == 2
    assert task.error is not None
    assert "Lease expired" in task.error


def test_fail_retries_until_attempts_run_out(service: TaskService) -> None:
    created = service.create_task(DIR, "p", max_attempts=2)
    service.acquire_task(DIR, "w1")
    first = service.fail_task(created.task_id, "flaky", "w1")
    assert (first.status, first.worker_id, first.error) == (TaskStatus.PENDING, None, "flaky")
    service.acquire_task(DIR, "w2")
    second = service.fail_task(created.task_id, "flaky again", "w2")
    assert second.status is TaskStatus.FAILED
    assert second.worker_id == "w2"
    assert second.completed_at is not None
    assert service.acquire_task(DIR, "w3") is None


def test_fail_without_retry_is_final(service: TaskService) -> None:
    created = service.create_task(DIR, "p", max_attempts=5)
    service.acquire_task(DIR, "w1")
    assert service.fail_task(created.task_id, "hopeless", "w1", retry=False).status is TaskStatus.FAILED


def test_cancel_pending_and_in_progress_but_not_final(service: TaskService) -> None:
    pending = service.create_task(DIR, "a")
    held = service.create_task(DIR, "b", "high")
    service.acquire_task(DIR, "w1")
    cancelled = service.cancel_task(held.task_id, "no longer needed")
    assert cancelled.status is TaskStatus.CANCELLED
    assert cancelled.error == "no longer needed"
    with pytest.raises(InvalidTransition, match="cancelled"):
        service.complete_task(held.task_id, "x", "w1")
    assert service.cancel_task(pending.task_id).status is TaskStatus.CANCELLED
    with pytest.raises(InvalidTransition, match="already cancelled"):
        service.cancel_task(pending.task_id)
    assert service.acquire_task(DIR, "w1") is None


def test_unknown_task_ids(service: TaskService) -> None:
    calls: list[Callable[[], object]] = [
        lambda: service.get_task("nope"),
        lambda: service.complete_task("nope", "x"),
        lambda: service.fail_task("nope", "x"),
        lambda: service.heartbeat_task("nope"),
        lambda: service.cancel_task("nope"),
    ]
    for call in calls:
        with pytest.raises(TaskNotFound, match="No task with id 'nope'"):
            call()


def test_last_error_survives_lease_expiry_and_a_cancel_without_reason(
    service: TaskService, clock: FakeClock
) -> None:
    created = service.create_task(DIR, "p", max_attempts=5)
    service.acquire_task(DIR, "w1")
    service.fail_task(created.task_id, "flaky network", "w1")
    service.acquire_task(DIR, "w2", lease_seconds=10)
    clock.advance(11)
    assert service.acquire_task("/elsewhere", "w3") is None  # recovery runs on any acquire
    recovered = service.get_task(created.task_id)
    assert (recovered.status, recovered.error) == (TaskStatus.PENDING, "flaky network")
    assert service.cancel_task(created.task_id).error == "flaky network"


def test_a_refusal_on_a_pending_task_says_how_it_got_there(service: TaskService) -> None:
    """A task back in the queue after a failure reported with retry: the refusal must not claim that
    a lease ran out when nobody's did."""
    made = service.create_task(DIR, "p")
    assert service.acquire_task(DIR, worker_id="a") is not None
    service.fail_task(made.task_id, "flaky", worker_id="a", retry=True)
    with pytest.raises(NotLeaseHolder) as refused:
        service.complete_task(made.task_id, "ok", worker_id="a")
    message = str(refused.value)
    assert "it is pending, not held by anyone" in message
    assert "back in the queue after attempt 1" in message
    assert "a failure was reported with retry" in message


def _nested(levels: int) -> dict[str, object]:
    """``levels`` objects and arrays inside one another, alternating, a string at the bottom."""
    value: object = "leaf"
    for level in range(levels - 1):
        value = [value] if level % 2 else {"k": value}
    return {"k": value}


def test_a_result_may_nest_64_levels_and_no_more(service: TaskService) -> None:
    """64 nested objects and arrays are stored and read back as given; a 65th is refused, and the task
    stays in progress (the limit used to count the leaf as a level: 64 containers were refused)."""
    deepest = _nested(MAX_JSON_DEPTH)
    task = service.create_task("/w", "deep")
    service.acquire_task("/w")
    with pytest.raises(InvalidInput, match="deeper than 64 levels"):
        service.complete_task(task.task_id, _nested(MAX_JSON_DEPTH + 1))
    assert service.get_task(task.task_id).status is TaskStatus.IN_PROGRESS
    assert service.complete_task(task.task_id, deepest).result == deepest
    assert service.get_task(task.task_id).result == deepest


def test_tags_are_trimmed_then_held_to_their_limit(service: TaskService) -> None:
    """Spaces around a tag are not part of it: a 64-character tag with a space after it is that tag
    (it was refused as too long), and a repeat of a tag is dropped; 65 characters are refused."""
    tag = "t" * MAX_TAG_CHARS
    assert service.create_task(DIR, "p", tags=[f" {tag} ", tag, "b "]).tags == [tag, "b"]
    with pytest.raises(InvalidInput, match="longer than 64"):
        service.create_task(DIR, "p", tags=[tag + "t"])


@pytest.mark.parametrize("directory", ["/repo\n", "/re\tpo", "/repo\r", "/repo\x1b[0m"])
def test_a_work_directory_with_control_characters_is_refused(service: TaskService, directory: str) -> None:
    """``/repo\\n`` (pwd's output pasted with its newline) would be a queue nobody in /repo finds."""
    with pytest.raises(InvalidInput, match="control characters"):
        service.create_task(directory, "p")
    with pytest.raises(InvalidInput, match="control characters"):
        service.acquire_task(directory)
    assert service.list_tasks().tasks == []


@pytest.mark.parametrize("text", ["\u200b", " \ufeff\u200b\t", "\u2060", "\u200b \u200b"])
def test_a_prompt_or_error_of_only_invisible_characters_is_empty(service: TaskService, text: str) -> None:
    with pytest.raises(InvalidInput, match="empty"):
        service.create_task(DIR, text)
    task = service.create_task(DIR, "p")
    service.acquire_task(DIR)
    with pytest.raises(InvalidInput, match="empty"):
        service.fail_task(task.task_id, text)
