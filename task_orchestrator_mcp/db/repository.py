"""Every query of the project.

The statements are written once, as SQLAlchemy Core over :mod:`tables`, and compiled once per dialect
into the driver's SQL (:class:`_Prepared`). They run on the driver connection of the caller's
transaction (:class:`DriverConnection`), which skips SQLAlchemy's per-statement execution machinery:
that machinery cost more than SQLite takes to run the statement, and three to four times the raw
driver on a claim. The price is that values cross the driver boundary here, in :class:`_Codec`,
instead of in column types: timestamps and JSON, the only columns that need it.

Rows become models in one place per shape (:func:`task_fields`, :meth:`TaskRepository._summaries`),
validated by pydantic (a list page in one call).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

from pydantic import TypeAdapter
from pydantic_core import from_json, to_json
from sqlalchemy import (
    Dialect,
    Integer,
    Update,
    and_,
    bindparam,
    exists,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.sql import ClauseElement

from task_orchestrator_mcp.db.engine import DriverConnection
from task_orchestrator_mcp.db.tables import UTCDateTime, task_history, task_tags, tasks
from task_orchestrator_mcp.models import HistoryEntry, Priority, Task, TaskStatus, TaskSummary

PRIORITY_RANK = {Priority.HIGH: 0, Priority.MEDIUM: 1, Priority.LOW: 2}
_PRIORITY_BY_RANK = {rank: priority.value for priority, rank in PRIORITY_RANK.items()}
_TASK_COLUMNS = (
    "id",
    "work_directory",
    "prompt",
    "priority",
    "tags",
    "status",
    "worker_id",
    "attempts",
    "max_attempts",
    "result",
    "error",
    "created_at",
    "updated_at",
    "started_at",
    "completed_at",
    "lease_expires_at",
    "lease_seconds",
)
assert tuple(column.name for column in tasks.c) == _TASK_COLUMNS, "task_fields reads rows by position"
_TIME_COLUMNS = frozenset(
    column.name
    for table in (tasks, task_history)
    for column in table.c
    if isinstance(column.type, UTCDateTime)
)
_JSON_COLUMNS = frozenset({"tags", "result", "details"})
_SUMMARIES = TypeAdapter(list[TaskSummary])
_PENDING, _IN_PROGRESS = TaskStatus.PENDING.value, TaskStatus.IN_PROGRESS.value
# PostgreSQL: the transaction-scoped advisory lock every create_task takes (an arbitrary constant,
# beside migrate's; fits a signed 64-bit integer).
_PG_CREATE_LOCK_KEY = 0x7A5C_0C4E_5A17_0002


@dataclass(frozen=True, slots=True)
class ListFilter:
    """What list_tasks narrows by; None means any."""

    work_directory: str | None = None
    status: TaskStatus | None = None
    priority: Priority | None = None
    tags: Sequence[str] = ()


# -- statements, compiled once per dialect ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A statement compiled for one dialect: its SQL, and how to lay out its parameters."""

    sql: str
    # Positional dialects (SQLite's qmark): the parameter tuple from a dict of values, in order.
    # Named dialects (psycopg's pyformat): None, and the dict is passed as it is.
    layout: Callable[[Mapping[str, Any]], tuple[Any, ...]] | None
    fixed: Mapping[str, Any]  # the statement's own literals (``status = 'pending'``, ``LIMIT 1``)

    @classmethod
    def compile(cls, stmt: ClauseElement, dialect: Dialect, column_keys: Sequence[str] | None) -> _Prepared:
        compiled: Any = stmt.compile(dialect=dialect, column_keys=list(column_keys) if column_keys else None)
        if "POSTCOMPILE" in compiled.string:  # an expanding parameter: the SQL would vary per call
            raise RuntimeError(f"cannot prepare {compiled.string!r}")
        # Required: insert columns and bindparam()s without a value, which every call gives.
        fixed = {k: v for k, v in compiled.params.items() if not compiled.binds[k].required}
        layout = None
        if compiled.positional:
            order = tuple(compiled.positiontup or ())
            getter = itemgetter(*order) if order else None
            layout = (
                (lambda _values: ())
                if getter is None
                else (lambda values: (getter(values),))
                if len(order) == 1
                else getter
            )
        return cls(compiled.string, layout, fixed)

    def params(self, given: dict[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        """The driver's parameters from the statement's own literals and ``given`` (built per call,
        so it is passed on, not copied)."""
        values = {**self.fixed, **given} if self.fixed else given
        return values if self.layout is None else self.layout(values)


def _candidate(row_locks: bool) -> Any:
    stmt = (
        select(tasks.c.id)
        .where(tasks.c.work_directory == bindparam("b_dir"), tasks.c.status == _PENDING)
        .order_by(tasks.c.priority, tasks.c.created_at, tasks.c.id)
        .limit(1)
    )
    # SQLite's BEGIN IMMEDIATE already serialises writers; FOR UPDATE SKIP LOCKED is PostgreSQL's.
    return stmt.with_for_update(skip_locked=True) if row_locks else stmt


def _claim(row_locks: bool) -> Update:
    return (
        update(tasks)
        .where(tasks.c.id == _candidate(row_locks).scalar_subquery(), tasks.c.status == _PENDING)
        .values(
            status=_IN_PROGRESS,
            worker_id=bindparam("b_worker"),
            attempts=tasks.c.attempts + 1,
            started_at=bindparam("b_now"),
            updated_at=bindparam("b_now"),
            lease_expires_at=bindparam("b_until"),
            lease_seconds=bindparam("b_lease"),
        )
        .returning(*tasks.c)
    )


_HISTORY_INSERT_COLUMNS = ["task_id", "from_status", "to_status", "worker_id", "at", "details"]


def _with_history(change: Update, history_row: Callable[[Any], Sequence[Any]]) -> ClauseElement:
    """PostgreSQL: ``change`` (an UPDATE ... RETURNING whole tasks) and, for each changed task, the
    history row ``history_row`` builds from its columns, in one statement (one round trip, not
    two); the statement returns the changed tasks."""
    changed = change.cte("changed")
    logged = (
        insert(task_history)
        .from_select(_HISTORY_INSERT_COLUMNS, select(*history_row(changed.c)))
        .cte("logged")
    )
    return select(*changed.c).add_cte(logged)


def _claim_recorded() -> ClauseElement:
    """The claim and its history row; the details are the claim's attempt and lease."""
    return _with_history(
        _claim(row_locks=True),
        lambda c: (
            c.id,
            literal_column(f"'{_PENDING}'"),
            literal_column(f"'{_IN_PROGRESS}'"),
            c.worker_id,
            c.started_at,
            func.jsonb_build_object(
                literal_column("'attempt'"), c.attempts, literal_column("'lease_seconds'"), c.lease_seconds
            ),
        ),
    )


def _update_held(keys: Sequence[str]) -> Update:
    return (
        update(tasks)
        .where(
            tasks.c.id == bindparam("b_id"),
            tasks.c.status == _IN_PROGRESS,
            tasks.c.worker_id == bindparam("b_worker"),
        )
        .values({key: bindparam(f"v_{key}") for key in keys})
        .returning(*tasks.c)
    )


def _update_held_recorded(keys: Sequence[str]) -> ClauseElement:
    """The guarded update and its history row (the holder given, as on SQLite)."""
    return _with_history(
        _update_held(keys),
        lambda c: (
            c.id,
            literal_column(f"'{_IN_PROGRESS}'"),
            bindparam("h_to", type_=task_history.c.to_status.type),
            bindparam("b_worker", type_=task_history.c.worker_id.type),
            bindparam("h_at", type_=UTCDateTime()),
            bindparam("h_details", type_=task_history.c.details.type),
        ),
    )


def _expired(row_locks: bool) -> ClauseElement:
    stmt = (
        select(tasks)
        .where(tasks.c.status == _IN_PROGRESS, tasks.c.lease_expires_at < bindparam("b_now"))
        .order_by(tasks.c.lease_expires_at)
        .limit(bindparam("b_limit", type_=Integer))
    )
    return stmt.with_for_update(skip_locked=True) if row_locks else stmt


def _get(for_update: bool) -> ClauseElement:
    stmt = select(tasks).where(tasks.c.id == bindparam("b_id"))
    return stmt.with_for_update() if for_update else stmt


def _get_held(for_update: bool) -> ClauseElement:
    stmt = select(tasks).where(
        tasks.c.id == bindparam("b_id"),
        tasks.c.status == _IN_PROGRESS,
        tasks.c.worker_id == bindparam("b_worker"),
    )
    return stmt.with_for_update() if for_update else stmt


def _list_page(
    shape: tuple[bool, bool, bool, int, bool], prompt_chars: int
) -> ClauseElement:  # the filters present, not their values: one compiled form per combination
    by_directory, by_status, by_priority, tag_count, paged = shape
    conditions: list[Any] = []
    if by_directory:
        conditions.append(tasks.c.work_directory == bindparam("b_dir"))
    if by_status:
        conditions.append(tasks.c.status == bindparam("b_status"))
    if by_priority:
        conditions.append(tasks.c.priority == bindparam("b_priority"))
    conditions.extend(
        exists().where(task_tags.c.task_id == tasks.c.id, task_tags.c.tag == bindparam(f"b_tag{i}"))
        for i in range(tag_count)
    )
    if paged:
        # Row-value comparison written out, so both engines use the (created_at, id) index.
        after_at: Any = bindparam("b_after_at")
        after_id: Any = bindparam("b_after_id")
        conditions.append(
            or_(tasks.c.created_at > after_at, and_(tasks.c.created_at == after_at, tasks.c.id > after_id))
        )
    return (
        select(
            tasks.c.id,
            tasks.c.work_directory,
            func.substr(tasks.c.prompt, 1, prompt_chars).label("prompt"),
            (func.length(tasks.c.prompt) > prompt_chars).label("prompt_truncated"),
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
        .where(*conditions)
        .order_by(tasks.c.created_at, tasks.c.id)
        .limit(bindparam("b_limit", type_=Integer))
    )


_HISTORY_COLUMNS = ("from_status", "to_status", "worker_id", "at", "details")


def _time_out(value: Any) -> datetime | None:
    """A stored timestamp as an aware UTC datetime (SQLite text, or a driver/SQLAlchemy datetime)."""
    if value is None:
        return None
    if isinstance(value, str):
        return datetime.fromisoformat(value + "+00:00")
    out: datetime = value.astimezone(UTC) if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return out


def _same(value: Any) -> Any:
    return value


# -- values across the driver boundary -------------------------------------------------------------


class _Codec:
    """Timestamps and JSON to and from what the driver stores.

    SQLite: timestamps are naive UTC text in SQLAlchemy's layout (``2026-01-02 03:04:05.000006``,
    always six fraction digits, so text order is time order and rows written by either path compare
    right); JSON is text. PostgreSQL (psycopg): timestamptz and JSONB, both adapted by the driver.
    """

    def __init__(self, dialect: Dialect) -> None:
        self.sqlite = dialect.name == "sqlite"
        self._last_time: tuple[datetime | None, str] = (None, "")
        if not self.sqlite:
            from psycopg.types.json import Jsonb

            self._jsonb = Jsonb

    def time_in(self, value: datetime | None) -> Any:
        if value is None or not self.sqlite:
            if value is not None and value.tzinfo is None:
                raise ValueError("naive datetime given to a UTC column")
            return value
        # One operation stores the same instant several times (updated_at, started_at, history):
        # the last conversion is kept, as one tuple so that threads sharing the codec never see a
        # value paired with another's text.
        last = self._last_time
        if last[0] is value:
            return last[1]
        if value.tzinfo is UTC:  # the service's own clock: drop the "+00:00" instead of converting
            text = value.isoformat(" ", "microseconds")[:-6]
        elif value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        else:
            text = value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
        self._last_time = (value, text)
        return text

    def json_in(self, value: Any) -> Any:
        if value is None:
            return None
        if self.sqlite:
            return to_json(value).decode()
        return self._jsonb(value)

    def json_out(self, value: Any) -> Any:
        # psycopg has already decoded JSONB (and a JSON string value must stay a string).
        return from_json(value) if self.sqlite and value is not None else value

    def values_in(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Column values (keyed by column name) as the driver takes them."""
        out = dict(values)
        for key, value in values.items():
            if key in _TIME_COLUMNS:
                out[key] = self.time_in(value)
            elif key in _JSON_COLUMNS:
                out[key] = self.json_in(value)
        return out


# Per dialect: its codec, and its statements compiled as they are first used. Weak keys, so an engine
# that is disposed of takes its dialect along.
_DIALECTS: weakref.WeakKeyDictionary[Dialect, tuple[_Codec, dict[Hashable, _Prepared]]] = (
    weakref.WeakKeyDictionary()
)
# A process has one dialect: the last one seen is kept here too, which spares each repository the
# weak-keyed lookup (it costs more than the rest of making a repository). This one reference keeps
# at most one disposed engine's dialect alive, until another dialect is seen.
_last_dialect: list[tuple[Dialect, tuple[_Codec, dict[Hashable, _Prepared]]]] = []


def _of_dialect(dialect: Dialect) -> tuple[_Codec, dict[Hashable, _Prepared]]:
    for known, state in _last_dialect:
        if known is dialect:
            return state
    found = _DIALECTS.get(dialect)
    if found is None:
        found = _DIALECTS.setdefault(dialect, (_Codec(dialect), {}))
    _last_dialect[:] = [(dialect, found)]
    return found


# -- the repository --------------------------------------------------------------------------------


class TaskRepository:
    """Named queries over one driver connection; the caller owns the transaction."""

    def __init__(self, conn: DriverConnection) -> None:
        self._conn = conn
        self._dialect = dialect = conn.dialect
        self._codec, self._statements = _of_dialect(dialect)
        self._row_locks = not conn.is_sqlite
        # PostgreSQL runs data-modifying WITH clauses: a change and its history row in one round trip.
        self._dml_in_with = not conn.is_sqlite

    def _run(
        self,
        key: Hashable,
        build: Callable[[], ClauseElement],
        given: dict[str, Any],
        column_keys: Sequence[str] = (),
    ) -> Any:
        prepared = self._statement(key, build, column_keys)
        return self._conn.execute(prepared.sql, prepared.params(given))

    def _statement(
        self, key: Hashable, build: Callable[[], ClauseElement], column_keys: Sequence[str] = ()
    ) -> _Prepared:
        """The statement under ``key``, compiled from ``build()`` the first time."""
        found = self._statements.get(key)
        if found is None:
            found = self._statements[key] = _Prepared.compile(build(), self._dialect, column_keys)
        return found

    # -- writes -------------------------------------------------------------------------------------

    def take_turn_to_create(self) -> None:
        """Wait until no other transaction is creating a task, and keep others waiting until this one
        ends. PostgreSQL only (SQLite's write lock already does it): a create that reads its clock
        after this commits after every create that read its clock before, so creation times follow
        commit order and a list cursor never passes a task that commits later."""
        if self._row_locks:
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_CREATE_LOCK_KEY,))

    def insert_task(self, values: Mapping[str, Any]) -> Task:
        """Insert one task row (``values`` keyed by column) and its tag rows."""
        keys = tuple(values)
        cursor = self._run(
            ("insert_task", keys),
            lambda: insert(tasks).returning(*tasks.c),
            self._codec.values_in(values),
            keys,
        )
        row = cursor.fetchall()[0]
        if values["tags"]:
            prepared = self._statement("insert_tag", lambda: insert(task_tags), ("task_id", "tag"))
            rows = [prepared.params({"task_id": values["id"], "tag": tag}) for tag in values["tags"]]
            self._conn.executemany(prepared.sql, rows)
        return self._task(row)

    def claim_next(
        self, work_directory: str, worker_id: str, now: datetime, lease_until: datetime, lease_seconds: int
    ) -> Task | None:
        """Claim the first pending task of a directory in (priority, age) order, and record the claim
        in its history (pending -> in_progress, details: the attempt and the lease length).

        ``UPDATE ... WHERE id = (SELECT ... LIMIT 1 [FOR UPDATE SKIP LOCKED]) AND status = 'pending'``:
        on PostgreSQL the sub-select locks the row (skipping rows other claimers hold) and the status
        predicate is re-checked on the locked row, so two transactions can never claim one row; on
        SQLite the write transaction already excludes every other writer. PostgreSQL writes the
        history row in the same statement; SQLite, in-process, runs a second one.
        """
        given = {
            "b_dir": work_directory,
            "b_worker": worker_id,
            "b_now": self._codec.time_in(now),
            "b_until": self._codec.time_in(lease_until),
            "b_lease": lease_seconds,
        }
        if self._dml_in_with:
            rows = self._run("claim_recorded", _claim_recorded, given).fetchall()
            return self._task(rows[0]) if rows else None
        rows = self._run("claim", lambda: _claim(row_locks=False), given).fetchall()
        if not rows:
            return None
        task = self._task(rows[0])
        self.add_history(
            task.task_id,
            TaskStatus.PENDING,
            TaskStatus.IN_PROGRESS,
            worker_id,
            now,
            {"attempt": task.attempts, "lease_seconds": lease_seconds},
        )
        return task

    def update_task(self, task_id: str, values: Mapping[str, Any]) -> Task:
        """Set columns of one task and return it as it now is."""
        keys = tuple(values)
        given = self._codec.values_in(values)
        given["b_id"] = task_id
        # No .values(): the SET clause follows the column keys; one compiled form per set of keys.
        rows = self._run(
            ("update_task", keys),
            lambda: update(tasks).where(tasks.c.id == bindparam("b_id")).returning(*tasks.c),
            given,
            keys,
        ).fetchall()
        return self._task(rows[0])

    def update_held_task(
        self,
        task_id: str,
        worker_id: str,
        values: Mapping[str, Any],
        *,
        to_status: TaskStatus,
        at: datetime,
        details: Mapping[str, Any] | None = None,
    ) -> Task | None:
        """Set columns of one task only if it is in progress and held by ``worker_id``, and record
        the change in its history (in_progress -> ``to_status``); the task as it now is, or None if
        that condition did not hold (nothing changed, nothing recorded). One statement on
        PostgreSQL, two on SQLite."""
        keys = tuple(values)
        converted = self._codec.values_in(values)
        given = {f"v_{key}": converted[key] for key in keys}
        given["b_id"] = task_id
        given["b_worker"] = worker_id
        if self._dml_in_with:
            given["h_to"] = to_status.value
            given["h_at"] = self._codec.time_in(at)
            given["h_details"] = self._codec.json_in(None if details is None else dict(details))
            rows = self._run(
                ("update_held_recorded", keys), lambda: _update_held_recorded(keys), given
            ).fetchall()
            return self._task(rows[0]) if rows else None
        rows = self._run(("update_held", keys), lambda: _update_held(keys), given).fetchall()
        if not rows:
            return None
        self.add_history(task_id, TaskStatus.IN_PROGRESS, to_status, worker_id, at, details)
        return self._task(rows[0])

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
        self._run(
            "insert_history",
            # inline(): no RETURNING of the generated id, which nothing reads.
            lambda: insert(task_history).inline(),
            {
                "task_id": task_id,
                "from_status": None if from_status is None else from_status.value,
                "to_status": to_status.value,
                "worker_id": worker_id,
                "at": self._codec.time_in(at),
                "details": self._codec.json_in(None if details is None else dict(details)),
            },
            ("task_id", "from_status", "to_status", "worker_id", "at", "details"),
        )

    # -- reads --------------------------------------------------------------------------------------

    def get(self, task_id: str, *, for_update: bool = False) -> Task | None:
        """One task by id; ``for_update`` locks its row until the transaction ends (PostgreSQL)."""
        lock = for_update and self._row_locks
        row = self._run(("get", lock), lambda: _get(lock), {"b_id": task_id}).fetchone()
        return None if row is None else self._task(row)

    def get_held(self, task_id: str, worker_id: str) -> Task | None:
        """The task if it is in progress and held by ``worker_id``, its row locked until the
        transaction ends (PostgreSQL, which re-checks the holder after waiting for the lock); else
        None, and nothing locked."""
        lock = self._row_locks
        row = self._run(
            ("get_held", lock), lambda: _get_held(lock), {"b_id": task_id, "b_worker": worker_id}
        ).fetchone()
        return None if row is None else self._task(row)

    def lease_seconds(self, task_id: str) -> int | None:
        """The lease length the task was last claimed or extended with."""
        row = self._run(
            "lease_seconds",
            lambda: select(tasks.c.lease_seconds).where(tasks.c.id == bindparam("b_id")),
            {"b_id": task_id},
        ).fetchone()
        return None if row is None else row[0]

    def earliest_lease_expiry(self) -> datetime | None:
        """When the first running lease ends (None: no task is in progress); one index probe.

        ORDER BY ... LIMIT 1 rather than min(): SQLite reads one index entry for it, but walks every
        in-progress entry for min() with the status prefix."""
        row = self._run(
            "earliest_lease",
            lambda: (
                select(tasks.c.lease_expires_at)
                .where(tasks.c.status == _IN_PROGRESS, tasks.c.lease_expires_at.is_not(None))
                .order_by(tasks.c.lease_expires_at)
                .limit(1)
            ),
            {},
        ).fetchone()
        return None if row is None else _time_out(row[0])

    def latest_creation_time(self) -> datetime | None:
        """When the newest task was created (None: there are no tasks); one index probe."""
        row = self._run(
            "latest_created",
            lambda: select(tasks.c.created_at).order_by(tasks.c.created_at.desc()).limit(1),
            {},
        ).fetchone()
        return None if row is None else _time_out(row[0])

    def expired_leases(self, now: datetime, limit: int) -> list[Task]:
        """In-progress tasks whose lease ended before ``now``, locked (skipping ones others hold)."""
        rows = self._run(
            ("expired", self._row_locks),
            lambda: _expired(self._row_locks),
            {"b_now": self._codec.time_in(now), "b_limit": limit},
        ).fetchall()
        return [self._task(row) for row in rows]

    def history(self, task_id: str) -> list[HistoryEntry]:
        """Every status change of a task, oldest first."""
        rows = self._run(
            "history",
            lambda: (
                select(*(task_history.c[name] for name in _HISTORY_COLUMNS))
                .where(task_history.c.task_id == bindparam("b_id"))
                .order_by(task_history.c.id)
            ),
            {"b_id": task_id},
        ).fetchall()
        json_out = self._codec.json_out
        return [
            HistoryEntry.model_validate(
                {
                    "from_status": r[0],
                    "to_status": r[1],
                    "worker_id": r[2],
                    "at": _time_out(r[3]),
                    "details": json_out(r[4]),
                }
            )
            for r in rows
        ]

    def list_page(
        self, flt: ListFilter, after: tuple[datetime, str] | None, limit: int, prompt_chars: int
    ) -> list[TaskSummary]:
        """Up to ``limit`` tasks in creation order, strictly after the ``after`` key when given.

        Prompts are cut to ``prompt_chars`` in SQL, so a page never carries megabytes of prompt.
        """
        shape = (
            flt.work_directory is not None,
            flt.status is not None,
            flt.priority is not None,
            len(flt.tags),
            after is not None,
        )
        given: dict[str, Any] = {"b_limit": limit}
        if flt.work_directory is not None:
            given["b_dir"] = flt.work_directory
        if flt.status is not None:
            given["b_status"] = flt.status.value
        if flt.priority is not None:
            given["b_priority"] = PRIORITY_RANK[flt.priority]
        for i, tag in enumerate(flt.tags):
            given[f"b_tag{i}"] = tag
        if after is not None:
            given["b_after_at"] = self._codec.time_in(after[0])
            given["b_after_id"] = after[1]
        rows = self._run(
            ("list", shape, prompt_chars), lambda: _list_page(shape, prompt_chars), given
        ).fetchall()
        return self._summaries(rows)

    # -- rows to models -----------------------------------------------------------------------------

    def _task(self, row: Sequence[Any]) -> Task:
        """The single door from a full ``tasks`` row to a :class:`Task`."""
        return Task.model_validate(task_fields(row, self._codec.json_out))

    def _summaries(self, rows: Sequence[Sequence[Any]]) -> list[TaskSummary]:
        json_out = self._codec.json_out
        return _SUMMARIES.validate_python(
            [
                {
                    "task_id": row[0],
                    "work_directory": row[1],
                    "prompt": row[2],
                    "prompt_truncated": bool(row[3]),
                    "priority": _PRIORITY_BY_RANK[row[4]],
                    "tags": json_out(row[5]),
                    "status": row[6],
                    "worker_id": row[7],
                    "attempts": row[8],
                    "max_attempts": row[9],
                    "created_at": _time_out(row[10]),
                    "updated_at": _time_out(row[11]),
                    "lease_expires_at": _time_out(row[12]),
                }
                for row in rows
            ]
        )


def task_fields(row: Sequence[Any], json_out: Callable[[Any], Any] = _same) -> dict[str, Any]:
    """A full ``tasks`` row (columns in table order) as :class:`Task` fields; ``json_out`` decodes the
    JSON columns if the reader has not (the raw SQLite driver has not; psycopg and SQLAlchemy have)."""
    # By position (see _TASK_COLUMNS): this runs for every task a call returns.
    return {
        "task_id": row[0],
        "work_directory": row[1],
        "prompt": row[2],
        "priority": _PRIORITY_BY_RANK[row[3]],
        "tags": json_out(row[4]),
        "status": row[5],
        "worker_id": row[6],
        "attempts": row[7],
        "max_attempts": row[8],
        "result": json_out(row[9]),
        "error": row[10],
        "created_at": _time_out(row[11]),
        "updated_at": _time_out(row[12]),
        "started_at": _time_out(row[13]),
        "completed_at": _time_out(row[14]),
        "lease_expires_at": _time_out(row[15]),
    }


def task_from_row(row: Sequence[Any]) -> Task:
    """A :class:`Task` from a full ``tasks`` row read through SQLAlchemy (its column types applied):
    for tests and tools that inspect the database with SQLAlchemy directly."""
    return Task.model_validate(task_fields(row))


__all__ = ["PRIORITY_RANK", "ListFilter", "TaskRepository", "task_fields", "task_from_row"]
