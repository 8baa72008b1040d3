"""Model-based proof of the queue: a hypothesis state machine drives the real TaskService on a real
database and, after every step, compares every task (status, holder, attempts, result, error, lease,
timestamps and the full history) with a tiny in-memory model of the rules.

Rules exercised: create (several directories, priorities, max_attempts), acquire (several workers and
the service's default worker), heartbeat, complete, fail with and without retry, cancel, unknown ids,
and lease expiry by advancing the injected FakeClock (leases are recovered, globally, at the start of
every acquire; the old holder may still finish a lease that expired as long as nobody recovered it).

Invariants: at most one holder per task (only the model's holder may act on it), a finished task never
changes again, attempts never exceed max_attempts, and the history is exactly the expected transitions.

Runs on SQLite (a fresh file per example) and on PostgreSQL (tables emptied per example; skipped unless
TASK_ORCHESTRATOR_TEST_POSTGRES_URL is set), with fewer examples there.

    pytest tests/proofs/test_model.py                         # CI size: ~2,900 checked steps, ~14 s CPU
    TASK_ORCHESTRATOR_SOAK=1 pytest tests/proofs/test_model.py  # soak: ~25x the examples, longer runs
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from sqlalchemy import select

from task_orchestrator_mcp.db.engine import Database
from task_orchestrator_mcp.db.migrate import ensure_schema
from task_orchestrator_mcp.db.repository import task_from_row
from task_orchestrator_mcp.db.tables import task_history
from task_orchestrator_mcp.db.tables import tasks as tasks_table
from task_orchestrator_mcp.errors import InvalidTransition, NotLeaseHolder, TaskNotFound
from task_orchestrator_mcp.models import Task, TaskStatus
from task_orchestrator_mcp.service import EXPIRY_BATCH, TaskService
from tests.proofs.support import SqliteTemplate, clear_tables, quiet_logs, soak
from tests.support import FakeClock, fresh_postgres_database, postgres_admin_url

DEFAULT_WORKER = "svc-default"
WORKERS = ["w1", "w2", "w3"]
# Two directories, one written in a non-normal form: the service must treat both spellings as one.
DIRECTORIES = {"/work/a": "/work/a", "/work/./a/": "/work/a", "/work/b": "/work/b"}
PRIORITY_RANK = {"high": 0, "medium": 1, "low": 2}
# Keep the whole population under the recovery batch, so one acquire recovers every expired lease
# (the batch order among equal expiry instants is unspecified; see the report).
MAX_TASKS = 30
assert MAX_TASKS < EXPIRY_BATCH

PENDING = TaskStatus.PENDING
IN_PROGRESS = TaskStatus.IN_PROGRESS
COMPLETED = TaskStatus.COMPLETED
FAILED = TaskStatus.FAILED
CANCELLED = TaskStatus.CANCELLED

History = tuple[TaskStatus | None, TaskStatus, str | None, datetime, dict[str, Any] | None]

text_values = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8)
results = st.one_of(
    text_values,
    st.dictionaries(text_values, st.one_of(st.integers(-(2**40), 2**40), text_values, st.none()), max_size=3),
)
errors = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12).filter(
    str.strip
)
workers = st.sampled_from([*WORKERS, None])


@dataclass
class ModelTask:
    """What the model believes about one task."""

    task_id: str
    directory: str
    rank: int
    max_attempts: int
    created_at: datetime
    status: TaskStatus = PENDING
    worker: str | None = None
    attempts: int = 0
    result: Any = None
    error: str | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    updated_at: datetime | None = None
    lease_expires_at: datetime | None = None
    lease_seconds: int | None = None
    history: list[History] = field(default_factory=list)

    def claim_key(self) -> tuple[int, datetime, str]:
        """The order acquire claims in: priority, then age, then id (ties on the same instant)."""
        return (self.rank, self.created_at, self.task_id)


def _caller(task: ModelTask, worker: str | None, as_holder: bool) -> tuple[str | None, str]:
    """The worker argument to pass (None for the service's default) and who that really is.

    With ``as_holder`` the call is made as the task's current holder, when it has one.
    """
    if as_holder and task.worker is not None:
        worker = None if task.worker == DEFAULT_WORKER else task.worker
    return worker, worker or DEFAULT_WORKER


class QueueMachine(RuleBasedStateMachine):
    """The state machine; :func:`machine_for` binds it to a database factory."""

    fresh_database: Callable[[], Database]
    release_database: Callable[[Database], None]

    tasks = Bundle("tasks")
    # Examples and checked steps, for the run's summary line (shown with ``pytest -s``).
    counts: dict[str, int]

    def __init__(self) -> None:
        super().__init__()
        self.counts["examples"] += 1
        self.clock = FakeClock()
        self.db = self.fresh_database()
        self.service = TaskService(self.db, clock=self.clock, worker_id=DEFAULT_WORKER)
        self.model: dict[str, ModelTask] = {}
        # The first full snapshot of each task once it became final: it must never change again.
        self.frozen: dict[str, Any] = {}
        # Tasks a rule changed or reported: the next check also reads them through get_task.
        self.touched: set[str] = set()

    def teardown(self) -> None:
        """Hand the database back (SQLite: close it; PostgreSQL: keep the shared engine open)."""
        self.release_database(self.db)

    # -- helpers --------------------------------------------------------------------------------------

    @property
    def now(self) -> datetime:
        """The fake clock's instant."""
        return self.clock.now

    def _refusal(self, task: ModelTask, worker: str) -> type[Exception] | None:
        """The error a heartbeat/complete/fail by ``worker`` must get, or None when it may act."""
        if task.status is IN_PROGRESS:
            return None if task.worker == worker else NotLeaseHolder
        if task.status is PENDING:
            return NotLeaseHolder
        return InvalidTransition

    def _recover_expired(self) -> None:
        # Mirrors TaskService._recover_expired: strictly earlier expiry, every task (all directories).
        expired = sorted(
            (
                t
                for t in self.model.values()
                if t.status is IN_PROGRESS
                and t.lease_expires_at is not None
                and t.lease_expires_at < self.now
            ),
            key=lambda t: (t.lease_expires_at, t.task_id),
        )
        for t in expired:
            assert t.lease_expires_at is not None
            again = t.attempts < t.max_attempts
            to = PENDING if again else FAILED
            t.history.append(
                (
                    IN_PROGRESS,
                    to,
                    t.worker,
                    self.now,
                    {
                        "reason": "lease_expired",
                        "lease_expired_at": t.lease_expires_at.isoformat().replace("+00:00", "Z"),
                    },
                )
            )
            t.status = to
            t.updated_at = self.now
            t.lease_expires_at = None
            if again:
                t.worker = None
            else:
                t.error = f"Lease expired on attempt {t.attempts} of {t.max_attempts}."
                t.completed_at = self.now

    # -- rules ----------------------------------------------------------------------------------------

    @rule(
        target=tasks,
        directory=st.sampled_from(sorted(DIRECTORIES)),
        priority=st.sampled_from(sorted(PRIORITY_RANK)),
        max_attempts=st.integers(1, 3),
        tick=st.sampled_from([0, 0, 1]),
    )
    def create(self, directory: str, priority: str, max_attempts: int, tick: int) -> str:
        """Queue a task, often at the clock reading of the previous one: its creation time is then a
        microsecond after the newest task's (creation times strictly increase)."""
        if len(self.model) >= MAX_TASKS:
            # Too many tasks would exceed one recovery batch; hand back an existing id instead.
            return next(iter(self.model))
        self.clock.advance(tick)
        task = self.service.create_task(directory, f"prompt {len(self.model)}", priority, [], max_attempts)
        assert task.status is PENDING
        assert task.work_directory == DIRECTORIES[directory]
        assert task.task_id not in self.model
        newest = max((t.created_at for t in self.model.values()), default=None)
        created = self.now if newest is None or self.now > newest else newest + timedelta(microseconds=1)
        self.model[task.task_id] = ModelTask(
            task_id=task.task_id,
            directory=DIRECTORIES[directory],
            rank=PRIORITY_RANK[priority],
            max_attempts=max_attempts,
            created_at=created,
            updated_at=created,
            history=[(None, PENDING, None, created, None)],
        )
        return task.task_id

    @rule(
        directory=st.sampled_from(sorted(DIRECTORIES)),
        worker=workers,
        lease=st.sampled_from([None, 1, 5, 30]),
    )
    def acquire(self, directory: str, worker: str | None, lease: int | None) -> None:
        """Claim the next task of a directory; expired leases everywhere are recovered first."""
        got = self.service.acquire_task(directory, worker, lease)
        self._recover_expired()
        self.touched.update(t.task_id for t in self.model.values() if t.updated_at == self.now)
        holder = worker or DEFAULT_WORKER
        lease_len = lease or 900
        candidates = sorted(
            (t for t in self.model.values() if t.status is PENDING and t.directory == DIRECTORIES[directory]),
            key=ModelTask.claim_key,
        )
        if not candidates:
            assert got is None
            return
        expected = candidates[0]
        assert got is not None, f"expected {expected.task_id}, got nothing"
        assert got.task_id == expected.task_id
        expected.status = IN_PROGRESS
        expected.worker = holder
        expected.attempts += 1
        expected.started_at = self.now
        expected.updated_at = self.now
        expected.lease_expires_at = self.now + timedelta(seconds=lease_len)
        expected.lease_seconds = lease_len
        expected.history.append(
            (
                PENDING,
                IN_PROGRESS,
                holder,
                self.now,
                {"attempt": expected.attempts, "lease_seconds": lease_len},
            )
        )
        self._compare(got, expected)

    @rule(task_id=tasks, worker=workers, as_holder=st.booleans(), lease=st.sampled_from([None, 2, 10]))
    def heartbeat(self, task_id: str, worker: str | None, as_holder: bool, lease: int | None) -> None:
        """Extend a lease (usually by the holder; sometimes by someone else, who must be refused)."""
        task = self.model[task_id]
        worker, actor = _caller(task, worker, as_holder)
        refusal = self._refusal(task, actor)
        if refusal is not None:
            with pytest.raises(refusal):
                self.service.heartbeat_task(task_id, worker, lease)
            return
        got = self.service.heartbeat_task(task_id, worker, lease)
        length = lease or task.lease_seconds or 900
        task.lease_seconds = length
        task.lease_expires_at = self.now + timedelta(seconds=length)
        task.updated_at = self.now
        self._compare(got, task)

    @rule(task_id=tasks, worker=workers, as_holder=st.booleans(), result=results)
    def complete(self, task_id: str, worker: str | None, as_holder: bool, result: Any) -> None:
        """Finish a task with a result (refused unless the worker holds it)."""
        task = self.model[task_id]
        worker, actor = _caller(task, worker, as_holder)
        refusal = self._refusal(task, actor)
        if refusal is not None:
            with pytest.raises(refusal):
                self.service.complete_task(task_id, result, worker)
            return
        got = self.service.complete_task(task_id, result, worker)
        task.status = COMPLETED
        task.result = result
        task.updated_at = task.completed_at = self.now
        task.lease_expires_at = None
        task.history.append((IN_PROGRESS, COMPLETED, actor, self.now, None))
        self._compare(got, task)

    @rule(task_id=tasks, worker=workers, as_holder=st.booleans(), error=errors, retry=st.booleans())
    def fail(self, task_id: str, worker: str | None, as_holder: bool, error: str, retry: bool) -> None:
        """Report a failure: back to pending while attempts remain and retry is asked for, else failed."""
        task = self.model[task_id]
        worker, actor = _caller(task, worker, as_holder)
        refusal = self._refusal(task, actor)
        if refusal is not None:
            with pytest.raises(refusal):
                self.service.fail_task(task_id, error, worker, retry)
            return
        got = self.service.fail_task(task_id, error, worker, retry)
        again = retry and task.attempts < task.max_attempts
        to = PENDING if again else FAILED
        task.history.append((IN_PROGRESS, to, actor, self.now, {"error": error, "retry": again}))
        task.status = to
        task.error = error
        task.updated_at = self.now
        task.lease_expires_at = None
        if again:
            task.worker = None
        else:
            task.completed_at = self.now
        self._compare(got, task)

    @rule(task_id=tasks, reason=st.one_of(st.none(), errors))
    def cancel(self, task_id: str, reason: str | None) -> None:
        """Cancel a pending or in-progress task; a finished one is refused."""
        task = self.model[task_id]
        if task.status.is_final:
            with pytest.raises(InvalidTransition):
                self.service.cancel_task(task_id, reason)
            return
        got = self.service.cancel_task(task_id, reason)
        task.history.append(
            (task.status, CANCELLED, task.worker, self.now, None if reason is None else {"reason": reason})
        )
        task.status = CANCELLED
        if reason is not None:
            task.error = reason
        task.updated_at = task.completed_at = self.now
        task.lease_expires_at = None
        self._compare(got, task)

    @rule(seconds=st.sampled_from([1, 2, 5, 31]))
    def advance_clock(self, seconds: int) -> None:
        """Let time pass: leases may now be expired (recovered by the next acquire)."""
        self.clock.advance(seconds)

    @rule(task_id=st.sampled_from(["0" * 28, "nope", "x" * 256]))
    def unknown_task(self, task_id: str) -> None:
        """Operations on an id nobody created are refused with TaskNotFound and change nothing."""
        with pytest.raises(TaskNotFound):
            self.service.get_task(task_id)
        with pytest.raises(TaskNotFound):
            self.service.complete_task(task_id, "r", "w1")
        with pytest.raises(TaskNotFound):
            self.service.cancel_task(task_id)

    # -- checks ---------------------------------------------------------------------------------------

    def _compare(self, got: Task, want: ModelTask) -> None:
        self.touched.add(want.task_id)
        assert got.task_id == want.task_id
        assert got.work_directory == want.directory
        assert got.status is want.status, (got.status, want.status)
        assert got.worker_id == want.worker, (got.worker_id, want.worker)
        assert got.attempts == want.attempts
        assert got.max_attempts == want.max_attempts
        assert got.result == want.result
        assert got.error == want.error
        assert got.created_at == want.created_at
        assert got.updated_at == want.updated_at
        assert got.started_at == want.started_at
        assert got.completed_at == want.completed_at
        assert got.lease_expires_at == want.lease_expires_at

    @invariant()
    def database_agrees_with_model(self) -> None:
        """Every task, with its history, is exactly what the model expects; the invariants hold.

        One bulk read per step compares every task and every history row (cheap, so every step is
        checked); the tasks the step touched are also read through ``service.get_task`` itself.
        """
        with self.db.read() as conn:
            rows = {r.id: task_from_row(r) for r in conn.execute(select(tasks_table))}
            histories: dict[str, list[History]] = {task_id: [] for task_id in rows}
            for h in conn.execute(select(task_history).order_by(task_history.c.id)):
                histories[h.task_id].append(
                    (
                        None if h.from_status is None else TaskStatus(h.from_status),
                        TaskStatus(h.to_status),
                        h.worker_id,
                        h.at,
                        h.details,
                    )
                )
        assert sorted(rows) == sorted(self.model)
        for task_id in self.touched:
            full = self.service.get_task(task_id)
            assert full.model_dump(exclude={"history"}) == rows[task_id].model_dump()
            assert [(h.from_status, h.to_status, h.worker_id, h.at, h.details) for h in full.history] == (
                histories[task_id]
            )
        self.touched.clear()
        self.counts["steps"] += 1
        for task_id, want in self.model.items():
            got = rows[task_id]
            self._compare(got, want)
            history = histories[task_id]
            assert history == want.history
            # Attempts never exceed max_attempts; only an in-progress task has a lease (one holder).
            assert 0 <= got.attempts <= got.max_attempts
            assert (got.status is IN_PROGRESS) == (got.lease_expires_at is not None)
            if got.status is IN_PROGRESS:
                assert got.worker_id is not None
                # The holder is whoever made the last claim: nobody else can hold it at the same time.
                assert history[-1][1] is IN_PROGRESS
                assert history[-1][2] == got.worker_id
            if got.status is PENDING:
                assert got.worker_id is None
            # A finished task never changes again.
            if got.status.is_final:
                frozen = self.frozen.setdefault(task_id, (got.model_dump(), len(history)))
                assert (got.model_dump(), len(history)) == frozen
            # Every recorded transition is one the state machine allows.
            for before, after in itertools.pairwise(history):
                assert after[0] is before[1]
                assert not before[1].is_final


def machine_for(
    fresh_database: Callable[[], Database], release_database: Callable[[Database], None]
) -> type[QueueMachine]:
    """A QueueMachine subclass whose examples each start on an empty database from ``fresh_database``."""
    return type(
        "QueueMachineOnDatabase",
        (QueueMachine,),
        {
            "fresh_database": staticmethod(fresh_database),
            "release_database": staticmethod(release_database),
            "counts": {"examples": 0, "steps": 0},
        },
    )


def _run(machine: type[QueueMachine], examples: int, steps: int) -> None:
    run_state_machine_as_test(machine, settings=_settings(examples, steps))
    print(f"\n{machine.counts['examples']} examples, {machine.counts['steps']} checked steps")


def _settings(examples: int, steps: int) -> settings:
    scale = 25 if soak() else 1
    return settings(
        max_examples=examples * scale,
        stateful_step_count=steps * (2 if soak() else 1),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


def test_model_sqlite(tmp_path: Path) -> None:
    """The model and the service agree on SQLite, a fresh database file per example."""
    with quiet_logs():
        template = SqliteTemplate(tmp_path)

        def fresh() -> Database:
            # Durability is not what this proof checks: skip fsync so more examples fit the budget.
            return Database(template.fresh_url(), sqlite_synchronous="OFF")

        _run(machine_for(fresh, Database.dispose), 60, 40)


@pytest.mark.postgres
def test_model_postgres() -> None:
    """The model and the service agree on PostgreSQL (one database, emptied before each example)."""
    admin = postgres_admin_url()
    assert admin is not None
    with quiet_logs(), fresh_postgres_database(admin) as url:
        db = Database(url)
        try:
            ensure_schema(db)

            def fresh() -> Database:
                clear_tables(db)
                return db

            _run(machine_for(fresh, lambda _db: None), 15, 30)
        finally:
            db.dispose()
