"""Every query of the project. The repository receives a connection inside a transaction and never
owns the engine; rows become models in exactly one place (:func:`task_from_row`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import Connection, Integer, Row, and_, bindparam, exists, func, insert, or_, select, update

from task_orchestrator_mcp.db.tables import task_history, task_tags, tasks
from task_orchestrator_mcp.models import HistoryEntry, Priority, Task, TaskStatus, TaskSummary

PRIORITY_RANK = {Priority.HIGH: 0, Priority.MEDIUM: 1, Priority.LOW: 2}
_PRIORITY_BY_RANK = {rank: priority for priority, rank in PRIORITY_RANK.items()}


@dataclass(frozen=True, slots=True)
class ListFilter:
    """What list_tasks narrows by; None means any."""

    work_directory: str | None = None
    status: TaskStatus | None = None
    priority: Priority | None = None
    tags: Sequence[str] = ()


def task_from_row(row: Row[Any] | Mapping[str, Any]) -> Task:
    """The single door from a ``tasks`` row to a :class:`Task`."""
    m = row._mapping if isinstance(row, Row) else row
    # model_construct: the row comes from our own schema, already typed; validating it again would
    # cost more than the query (about a third of a 50-row list page).
    return Task.model_construct(
        task_id=m["id"],
        work_directory=m["work_directory"],
        prompt=m["prompt"],
        priority=_PRIORITY_BY_RANK[m["priority"]],
        tags=list(m["tags"]),
        status=TaskStatus(m["status"]),
        worker_id=m["worker_id"],
        attempts=m["attempts"],
        max_attempts=m["max_attempts"],
        result=m["result"],
        error=m["error"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        started_at=m["started_at"],
        completed_at=m["completed_at"],
        lease_expires_at=m["lease_expires_at"],
    )


@dataclass(frozen=True, slots=True)
class _Statements:
    insert_task: Any
    insert_tag: Any
    claim: Any
    update_task: Any
    insert_history: Any
    get: Any
    get_for_update: Any
    lease_seconds: Any
    expired_leases: Any
    history: Any


@cache
def _statements(*, row_locks: bool) -> _Statements:
    """The hot statements, built once with bind parameters.

    Building a statement and its cache key costs more CPU than SQLite takes to run it; a statement
    object that is reused keeps its memoised cache key, so SQLAlchemy goes straight to the compiled form.
    """
    pending, in_progress = TaskStatus.PENDING.value, TaskStatus.IN_PROGRESS.value
    candidate = (
        select(tasks.c.id)
        .where(tasks.c.work_directory == bindparam("b_dir"), tasks.c.status == pending)
        .order_by(tasks.c.priority, tasks.c.created_at, tasks.c.id)
        .limit(1)
    )
    expired = (
        select(tasks)
        .where(tasks.c.status == in_progress, tasks.c.lease_expires_at < bindparam("b_now"))
        .order_by(tasks.c.lease_expires_at)
        .limit(bindparam("b_limit", type_=Integer))
    )
    get = select(tasks).where(tasks.c.id == bindparam("b_id"))
    if row_locks:
        candidate = candidate.with_for_update(skip_locked=True)
        expired = expired.with_for_update(skip_locked=True)
    return _Statements(
        insert_task=insert(tasks).returning(*tasks.c),
        insert_tag=insert(task_tags),
        claim=update(tasks)
        .where(tasks.c.id == candidate.scalar_subquery(), tasks.c.status == pending)
        .values(
            status=in_progress,
            worker_id=bindparam("b_worker"),
            attempts=tasks.c.attempts + 1,
            started_at=bindparam("b_now"),
            updated_at=bindparam("b_now"),
            lease_expires_at=bindparam("b_until"),
            lease_seconds=bindparam("b_lease"),
        )
        .returning(*tasks.c),
        update_task=update(tasks).where(tasks.c.id == bindparam("b_id")).returning(*tasks.c),
        insert_history=insert(task_history),
        get=get,
        get_for_update=get.with_for_update() if row_locks else get,
        lease_seconds=select(tasks.c.lease_seconds).where(tasks.c.id == bindparam("b_id")),
        expired_leases=expired,
        history=select(task_history)
        .where(task_history.c.task_id == bindparam("b_id"))
        .order_by(task_history.c.id),
    )


class TaskRepository:
    """Named queries over one connection; the caller owns the transaction."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        # SQLite's BEGIN IMMEDIATE already serialises writers; FOR UPDATE is PostgreSQL's row lock.
        self._sql = _statements(row_locks=conn.dialect.name == "postgresql")

    # -- writes -------------------------------------------------------------------------------------

    def insert_task(self, values: Mapping[str, Any]) -> Task:
        """Insert one task row (``values`` keyed by column) and its tag rows."""
        row = self._conn.execute(self._sql.insert_task, dict(values)).one()
        if values["tags"]:
            self._conn.execute(
                self._sql.insert_tag, [{"task_id": values["id"], "tag": tag} for tag in values["tags"]]
            )
        return task_from_row(row)

    def claim_next(
        self, work_directory: str, worker_id: str, now: datetime, lease_until: datetime, lease_seconds: int
    ) -> Task | None:
        """Claim the first pending task of a directory in (priority, age) order, in one statement.

        ``UPDATE ... WHERE id = (SELECT ... LIMIT 1 [FOR UPDATE SKIP LOCKED]) AND status = 'pending'``:
        on PostgreSQL the sub-select locks the row (skipping rows other claimers hold) and the status
        predicate is re-checked on the locked row, so two transactions can never claim one row; on
        SQLite the write transaction already excludes every other writer.
        """
        row = self._conn.execute(
            self._sql.claim,
            {
                "b_dir": work_directory,
                "b_worker": worker_id,
                "b_now": now,
                "b_until": lease_until,
                "b_lease": lease_seconds,
            },
        ).one_or_none()
        return None if row is None else task_from_row(row)

    def update_task(self, task_id: str, values: Mapping[str, Any]) -> Task:
        """Set columns of one task and return it as it now is."""
        # No .values(): the SET clause follows the parameter keys, and the compiled form is cached
        # per set of keys.
        row = self._conn.execute(self._sql.update_task, {**values, "b_id": task_id}).one()
        return task_from_row(row)

    def add_history(
        self,
        task_id: str,
        from_status: TaskStatus | None,
        to_status: TaskStatus,
        worker_id: str | None,
        at: datetime,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """Record one status change."""
        self._conn.execute(
            self._sql.insert_history,
            {
                "task_id": task_id,
                "from_status": None if from_status is None else from_status.value,
                "to_status": to_status.value,
                "worker_id": worker_id,
                "at": at,
                "details": None if details is None else dict(details),
            },
        )

    # -- reads --------------------------------------------------------------------------------------

    def get(self, task_id: str, *, for_update: bool = False) -> Task | None:
        """One task by id; ``for_update`` locks its row until the transaction ends (PostgreSQL)."""
        stmt = self._sql.get_for_update if for_update else self._sql.get
        row = self._conn.execute(stmt, {"b_id": task_id}).one_or_none()
        return None if row is None else task_from_row(row)

    def lease_seconds(self, task_id: str) -> int | None:
        """The lease length the task was last claimed or extended with."""
        value: int | None = self._conn.execute(
            self._sql.lease_seconds, {"b_id": task_id}
        ).scalar_one_or_none()
        return value

    def expired_leases(self, now: datetime, limit: int) -> list[Task]:
        """In-progress tasks whose lease ended before ``now``, locked (skipping ones others hold)."""
        rows = self._conn.execute(self._sql.expired_leases, {"b_now": now, "b_limit": limit})
        return [task_from_row(row) for row in rows]

    def history(self, task_id: str) -> list[HistoryEntry]:
        """Every status change of a task, oldest first."""
        rows = self._conn.execute(self._sql.history, {"b_id": task_id})
        return [
            HistoryEntry.model_construct(
                from_status=None if r.from_status is None else TaskStatus(r.from_status),
                to_status=TaskStatus(r.to_status),
                worker_id=r.worker_id,
                at=r.at,
                details=r.details,
            )
            for r in rows
        ]

    def list_page(
        self, flt: ListFilter, after: tuple[datetime, str] | None, limit: int, prompt_chars: int
    ) -> list[TaskSummary]:
        """Up to ``limit`` tasks in creation order, strictly after the ``after`` key when given.

        Prompts are cut to ``prompt_chars`` in SQL, so a page never carries megabytes of prompt.
        """
        prompt_head = func.substr(tasks.c.prompt, 1, prompt_chars).label("prompt_head")
        prompt_len = func.length(tasks.c.prompt).label("prompt_len")
        stmt = select(
            tasks.c.id,
            tasks.c.work_directory,
            prompt_head,
            prompt_len,
            tasks.c.priority,
            tasks.c.tags,
            tasks.c.status,
            tasks.c.worker_id,
            tasks.c.attempts,
            tasks.c.max_attempts,
            tasks.c.created_at,
            tasks.c.updated_at,
            tasks.c.lease_expires_at,
        )
        conditions = []
        if flt.work_directory is not None:
            conditions.append(tasks.c.work_directory == flt.work_directory)
        if flt.status is not None:
            conditions.append(tasks.c.status == flt.status.value)
        if flt.priority is not None:
            conditions.append(tasks.c.priority == PRIORITY_RANK[flt.priority])
        for tag in flt.tags:
            conditions.append(exists().where(task_tags.c.task_id == tasks.c.id, task_tags.c.tag == tag))
        if after is not None:
            created, task_id = after
            # Row-value comparison written out, so both engines use the (created_at, id) index.
            conditions.append(
                or_(tasks.c.created_at > created, and_(tasks.c.created_at == created, tasks.c.id > task_id))
            )
        stmt = stmt.where(*conditions).order_by(tasks.c.created_at, tasks.c.id).limit(limit)
        return [
            TaskSummary.model_construct(
                task_id=r.id,
                work_directory=r.work_directory,
                prompt=r.prompt_head,
                prompt_truncated=r.prompt_len > prompt_chars,
                priority=_PRIORITY_BY_RANK[r.priority],
                tags=list(r.tags),
                status=TaskStatus(r.status),
                worker_id=r.worker_id,
                attempts=r.attempts,
                max_attempts=r.max_attempts,
                created_at=r.created_at,
                updated_at=r.updated_at,
                lease_expires_at=r.lease_expires_at,
            )
            for r in self._conn.execute(stmt)
        ]


__all__ = ["PRIORITY_RANK", "ListFilter", "TaskRepository", "task_from_row"]
