"""The task service: every rule of the queue (state machine, leases, ownership, input limits).

One transaction per operation. Tools call this; it calls the repository; it never sees SQL or MCP.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import posixpath
import re
import secrets
import socket
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from loguru import logger

from task_orchestrator_mcp.db.engine import Database
from task_orchestrator_mcp.db.repository import PRIORITY_RANK, ListFilter, TaskRepository
from task_orchestrator_mcp.errors import (
    InvalidInput,
    InvalidTransition,
    NotLeaseHolder,
    TaskNotFound,
    TaskOrchestratorError,
)
from task_orchestrator_mcp.models import (
    Priority,
    Task,
    TaskPage,
    TaskResult,
    TaskStatus,
    TaskWithHistory,
)

Clock = Callable[[], datetime]

MAX_LIST_LIMIT = 200
MAX_ATTEMPTS_LIMIT = 100
# Every lease is at least this long, in every process: a lease granted from now on cannot run out
# sooner than this from now, which is what lets acquire skip looking for expired leases (see
# _recover_expired).
MIN_LEASE_SECONDS = 1
MAX_LEASE_SECONDS = 7 * 86_400
MAX_TAGS = 32
MAX_TAG_CHARS = 64
# In UTF-8 bytes: the directory is a key of the claim index, and a PostgreSQL B-tree entry must fit in
# about 2.7 kB (a longer, incompressible path failed inside the database instead of being refused).
MAX_DIRECTORY_BYTES = 2048
MAX_ID_CHARS = 256
MAX_JSON_DEPTH = 64
LIST_PROMPT_CHARS = 200
# The finest step both engines store (SQLite's text keeps six fraction digits; PostgreSQL, microseconds).
_TICK = timedelta(microseconds=1)
# Leases recovered per acquire: bounds the work one call can be asked to do.
EXPIRY_BATCH = 100


def utc_now() -> datetime:
    """The real clock: timezone-aware UTC."""
    return datetime.now(UTC)


def default_worker_id() -> str:
    """An id for this server process: host, pid and a random suffix (pids are reused)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class TaskService:
    """The queue's operations. Thread-safe: each call runs its own transaction.

    Write operations read the clock after taking the write lock (on PostgreSQL, after locking the
    task's row), so a lease starts when it is granted (not before a wait for the lock) and creation
    times follow commit order (on PostgreSQL, creates take turns for that: see
    TaskRepository.take_turn_to_create); a create whose clock reads no later than the newest task's
    creation takes that plus a microsecond, so creation times strictly increase. One exception:
    complete_task is one guarded statement and reads the clock before it; on PostgreSQL, a
    completion that waited for the row (behind the holder's own heartbeat, say) is stamped up to
    that wait early.
    """

    def __init__(
        self,
        database: Database,
        *,
        clock: Clock = utc_now,
        worker_id: str | None = None,
        max_payload_bytes: int = 1024 * 1024,
        default_lease_seconds: int = 900,
    ) -> None:
        self._db = database
        self._clock = clock
        self.worker_id = (
            default_worker_id() if worker_id is None else _short_text(worker_id, "worker_id", MAX_ID_CHARS)
        )
        self._max_payload = max_payload_bytes
        self._default_lease = _int_in_range(
            default_lease_seconds, "default_lease_seconds", MIN_LEASE_SECONDS, MAX_LEASE_SECONDS
        )
        # (checked at, no lease can have run out before): set when a check found nothing expired.
        self._no_expiry: tuple[datetime, datetime] | None = None

    @property
    def reads_never_wait(self) -> bool:
        """True when a read can run inline on an event loop: SQLite in WAL mode, where a reader never
        waits for a writer and a read takes well under a millisecond. PostgreSQL reads are round
        trips over the network."""
        return self._db.is_sqlite and self._db.has_idle_connection

    # -- planner side -------------------------------------------------------------------------------

    def create_task(
        self,
        work_directory: str,
        prompt: str,
        priority: Priority | str = Priority.MEDIUM,
        tags: Sequence[str] = (),
        max_attempts: int = 3,
    ) -> Task:
        """Queue a new pending task."""
        directory = normalise_directory(work_directory)
        prompt = self._check_text(prompt, "prompt")
        prio = _priority(priority)
        clean_tags = _tags(tags)
        max_attempts = _int_in_range(max_attempts, "max_attempts", 1, MAX_ATTEMPTS_LIMIT)
        with self._db.transaction(write=True) as conn:
            repo = TaskRepository(conn)
            repo.take_turn_to_create()  # before the clock: creation times follow commit order
            now = self._now()
            # Strictly after the newest task, even if this clock reads the same tick, was stepped
            # back, or (PostgreSQL) runs behind another machine's: a list cursor must never pass a
            # task that commits after it.
            latest = repo.latest_creation_time()
            if latest is not None and now <= latest:
                now = latest + _TICK
            task_id = _new_task_id(now)
            task = repo.insert_task(
                {
                    "id": task_id,
                    "work_directory": directory,
                    "prompt": prompt,
                    "priority": PRIORITY_RANK[prio],
                    "tags": clean_tags,
                    "status": TaskStatus.PENDING.value,
                    "worker_id": None,
                    "attempts": 0,
                    "max_attempts": max_attempts,
                    "result": None,
                    "error": None,
                    "created_at": now,
                    "updated_at": now,
                    "started_at": None,
                    "completed_at": None,
                    "lease_expires_at": None,
                    "lease_seconds": None,
                }
            )
            repo.add_history(task_id, None, TaskStatus.PENDING, None, now)
        logger.debug("created task {} in {}", task_id, directory)
        return task

    def cancel_task(self, task_id: str, reason: str | None = None) -> Task:
        """Cancel a pending or in-progress task; a finished task cannot be cancelled."""
        task_id = _task_id(task_id)
        if reason is not None:
            reason = self._check_text(reason, "reason", allow_empty=True)
        with self._db.transaction(write=True) as conn:
            repo = TaskRepository(conn)
            task = _found(repo.get(task_id, for_update=True), task_id)
            now = self._now()  # after the row lock, which PostgreSQL may have waited for
            if task.status.is_final:
                raise InvalidTransition(
                    f"Task {task_id} is already {task.status.value}; only pending or in_progress tasks "
                    "can be cancelled."
                )
            values: dict[str, Any] = {
                "status": TaskStatus.CANCELLED.value,
                "updated_at": now,
                "completed_at": now,
                "lease_expires_at": None,
            }
            if reason is not None:  # without a reason, the last error (if any) stays readable
                values["error"] = reason
            updated = repo.update_task(task_id, values)
            repo.add_history(
                task_id,
                task.status,
                TaskStatus.CANCELLED,
                task.worker_id,
                now,
                None if reason is None else {"reason": reason},
            )
        return updated

    # -- worker side --------------------------------------------------------------------------------

    def acquire_task(
        self, work_directory: str, worker_id: str | None = None, lease_seconds: int | None = None
    ) -> Task | None:
        """Claim the highest-priority, oldest pending task of a directory, or None if there is none.

        Tasks whose lease expired are first returned to the queue (or failed for good when they used
        up their attempts), so work held by a dead agent comes back.
        """
        directory = normalise_directory(work_directory)
        worker = self._worker(worker_id)
        lease = self._lease(lease_seconds)
        with self._db.transaction(write=True) as conn:
            now = self._now()
            repo = TaskRepository(conn)
            self._recover_expired(repo, now)
            # Records the claim in the history too (details: attempt and lease length).
            return repo.claim_next(directory, worker, now, now + timedelta(seconds=lease), lease)

    def heartbeat_task(
        self, task_id: str, worker_id: str | None = None, lease_seconds: int | None = None
    ) -> Task:
        """Extend the holder's lease by ``lease_seconds`` from now (default: the last lease length)."""
        task_id = _task_id(task_id)
        worker = self._worker(worker_id)
        lease = None if lease_seconds is None else self._lease(lease_seconds)
        with self._db.transaction(write=True) as conn:
            repo = TaskRepository(conn)
            self._held(repo, task_id, worker, "heartbeat")
            now = self._now()  # after the row lock: the lease runs from when it is extended
            lease = lease or repo.lease_seconds(task_id) or self._default_lease
            return repo.update_task(
                task_id,
                {
                    "lease_expires_at": now + timedelta(seconds=lease),
                    "lease_seconds": lease,
                    "updated_at": now,
                },
            )

    def complete_task(self, task_id: str, result: TaskResult, worker_id: str | None = None) -> Task:
        """Finish a held task with its result."""
        task_id = _task_id(task_id)
        worker = self._worker(worker_id)
        result = self._check_result(result)
        with self._db.transaction(write=True) as conn:
            now = self._now()
            repo = TaskRepository(conn)
            # One guarded statement on the hot path; the task is read only to explain a refusal.
            updated = repo.update_held_task(
                task_id,
                worker,
                {
                    "status": TaskStatus.COMPLETED.value,
                    "result": result,
                    "updated_at": now,
                    "completed_at": now,
                    "lease_expires_at": None,
                },
                to_status=TaskStatus.COMPLETED,
                at=now,
            )
            if updated is None:
                raise _refusal(_found(repo.get(task_id), task_id), worker, "complete")
        return updated

    def fail_task(self, task_id: str, error: str, worker_id: str | None = None, retry: bool = True) -> Task:
        """Report a failure: back to pending while attempts remain and ``retry`` is true, else failed."""
        task_id = _task_id(task_id)
        worker = self._worker(worker_id)
        error = self._check_text(error, "error")
        if not isinstance(retry, bool):
            raise InvalidInput("retry must be true or false.")
        with self._db.transaction(write=True) as conn:
            repo = TaskRepository(conn)
            task = self._held(repo, task_id, worker, "fail")
            now = self._now()  # after the row lock
            again = retry and task.attempts < task.max_attempts
            to = TaskStatus.PENDING if again else TaskStatus.FAILED
            updated = repo.update_task(task_id, _release(to, now, error))
            repo.add_history(
                task_id, TaskStatus.IN_PROGRESS, to, worker, now, {"error": _clip(error), "retry": again}
            )
        return updated

    # -- reads --------------------------------------------------------------------------------------

    def get_task(self, task_id: str) -> TaskWithHistory:
        """A task and its full history."""
        task_id = _task_id(task_id)
        with self._db.transaction(write=False) as conn:
            repo = TaskRepository(conn)
            task = _found(repo.get(task_id), task_id)
            history = repo.history(task_id)
        return TaskWithHistory.model_validate({**dict(task), "history": history})

    def list_tasks(
        self,
        work_directory: str | None = None,
        status: TaskStatus | str | None = None,
        tags: Sequence[str] | None = None,
        priority: Priority | str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> TaskPage:
        """A page of tasks in creation order, filtered; pass ``next_cursor`` back for the next page.

        A cursor carries the filters of the listing it came from: given alone, it continues that
        listing; given with other filters, it is refused (its position means nothing there)."""
        flt = _list_filter(work_directory, status, priority, tags or ())
        limit = _int_in_range(limit, "limit", 1, MAX_LIST_LIMIT)
        after = None
        if cursor is not None:
            after, carried = _decode_cursor(cursor)
            if carried is not None and flt != carried:
                if flt != ListFilter():
                    raise InvalidInput(
                        "cursor belongs to a listing with other filters; pass it alone, or with the "
                        "same filters as the first page."
                    )
                flt = carried
        with self._db.transaction(write=False) as conn:
            rows = TaskRepository(conn).list_page(flt, after, limit + 1, LIST_PROMPT_CHARS)
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = _encode_cursor(rows[-1].created_at, rows[-1].task_id, flt) if more else None
        return TaskPage(tasks=rows, next_cursor=next_cursor)

    # -- rules --------------------------------------------------------------------------------------

    def _recover_expired(self, repo: TaskRepository, now: datetime) -> None:
        """Return expired leases to the queue (or fail them for good), oldest expiry first.

        Looking costs a statement per acquire, so a check that finds nothing expired also notes the
        earliest lease still running. Until that instant, and for at most MIN_LEASE_SECONDS (a lease
        granted meanwhile, by any process, runs at least that long), no lease can run out, and the
        next acquires of this process skip the look. Exact on SQLite with one clock (writers are
        serialised, so a lease granted after the check also read the clock after it). A recovery can
        come up to MIN_LEASE_SECONDS late where that does not hold: on PostgreSQL, a transaction that
        read its clock before the check and committed after it; clocks that disagree across
        machines; a wall clock stepped back and forward again.
        """
        known = self._no_expiry
        if known is not None and known[0] <= now < known[1]:
            return
        earliest = repo.earliest_lease_expiry()
        if earliest is None or earliest >= now:
            # Nothing to recover, so nothing this transaction does depends on it: safe to keep even if
            # the transaction later rolls back.
            horizon = now + timedelta(seconds=MIN_LEASE_SECONDS)
            self._no_expiry = (now, horizon if earliest is None else min(horizon, earliest))
            return
        for task in repo.expired_leases(now, EXPIRY_BATCH):
            again = task.attempts < task.max_attempts
            to = TaskStatus.PENDING if again else TaskStatus.FAILED
            error = None if again else f"Lease expired on attempt {task.attempts} of {task.max_attempts}."
            values = _release(to, now, error)
            if again:
                del values["error"]  # a lease running out is no error; keep the last real one
            repo.update_task(task.task_id, values)
            repo.add_history(
                task.task_id,
                TaskStatus.IN_PROGRESS,
                to,
                task.worker_id,
                now,
                {"reason": "lease_expired", "lease_expired_at": _iso(task.lease_expires_at)},
            )
            logger.info("lease of {} on task {} expired -> {}", task.worker_id, task.task_id, to.value)

    def _held(self, repo: TaskRepository, task_id: str, worker: str, action: str) -> Task:
        """The task, locked, if ``worker`` holds it; otherwise a refusal that says why. Only a held
        row is locked: a pending one locked while a refusal is made would be skipped by claims
        (``SKIP LOCKED``), which would then answer that nothing is pending."""
        task = repo.get_held(task_id, worker)
        if task is not None:
            return task
        raise _refusal(_found(repo.get(task_id), task_id), worker, action)

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is UTC:
            return now
        if now.tzinfo is None:
            raise ValueError("the clock must return timezone-aware datetimes")
        return now.astimezone(UTC)

    def _worker(self, worker_id: str | None) -> str:
        if worker_id is None:
            return self.worker_id
        return _short_text(worker_id, "worker_id", MAX_ID_CHARS)

    def _lease(self, lease_seconds: int | None) -> int:
        if lease_seconds is None:
            return self._default_lease
        return _int_in_range(lease_seconds, "lease_seconds", MIN_LEASE_SECONDS, MAX_LEASE_SECONDS)

    def _check_text(self, value: str, name: str, *, allow_empty: bool = False) -> str:
        if not isinstance(value, str):
            raise InvalidInput(f"{name} must be a string.")
        if not allow_empty and _blank(value):
            raise InvalidInput(f"{name} must not be empty or only whitespace.")
        size = len(_utf8(value, name))
        if size > self._max_payload:
            raise InvalidInput(f"{name} is {size} bytes; the limit is {self._max_payload} bytes.")
        if "\x00" in value:
            raise InvalidInput(f"{name} must not contain NUL (\\u0000) characters.")
        return value

    def _check_result(self, result: TaskResult) -> TaskResult:
        if isinstance(result, str):
            return self._check_text(result, "result", allow_empty=True)
        if not isinstance(result, dict):
            raise InvalidInput("result must be a JSON object or a string.")
        _check_json(result)
        try:
            encoded = json.dumps(result, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except (ValueError, TypeError) as exc:
            raise InvalidInput(f"result is not valid JSON: {exc}.") from None
        size = len(_utf8(encoded, "result"))
        if size > self._max_payload:
            raise InvalidInput(f"result is {size} bytes as JSON; the limit is {self._max_payload} bytes.")
        return result


# -- pure helpers (rules on values) ---------------------------------------------------------------


_CONTROL = re.compile("[\x00-\x1f\x7f]")
# Characters that show nothing and that str.strip() keeps: a prompt of only these is empty too.
_INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff"


def _blank(value: str) -> bool:
    """Only whitespace and invisible characters, in any mix. Each pass strips from both ends, so a
    real prompt costs two passes over its margins, never a scan of the whole text."""
    before = None
    while value != before:
        before = value
        value = value.strip().strip(_INVISIBLE)
    return not value


def normalise_directory(path: str) -> str:
    """An absolute directory, normalised lexically (``/a/./b/`` -> ``/a/b``); the disk is not read."""
    if not isinstance(path, str) or not path.strip():
        raise InvalidInput("work_directory must be a non-empty absolute path, e.g. /home/me/project.")
    size = len(_utf8(path, "work_directory"))
    if "\x00" in path:
        raise InvalidInput("work_directory must not contain NUL characters.")
    if size > MAX_DIRECTORY_BYTES:
        raise InvalidInput(f"work_directory is {size} bytes as UTF-8; the limit is {MAX_DIRECTORY_BYTES}.")
    # Legal in a POSIX name, but "/repo\n" (pwd's output, pasted) would be a queue of its own that
    # nobody working in /repo ever finds.
    if _CONTROL.search(path):
        raise InvalidInput(
            "work_directory must not contain control characters (newline, tab...); "
            f"got {_clip(repr(path), 80)}."
        )
    if not path.startswith("/"):
        raise InvalidInput(f"work_directory must be absolute (start with /); got {_clip(path, 80)!r}.")
    normal = posixpath.normpath(path)
    # POSIX keeps a leading '//' as implementation-defined; treat it as '/'.
    return "/" + normal.lstrip("/")


def _utf8(value: str, name: str) -> bytes:
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{name} is not valid Unicode (it contains a lone surrogate).") from None


def _short_text(value: object, name: str, max_chars: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{name} must be a non-empty string.")
    if len(value) > max_chars:
        raise InvalidInput(f"{name} is longer than {max_chars} characters.")
    if "\x00" in value:
        raise InvalidInput(f"{name} must not contain NUL characters.")
    _utf8(value, name)
    return value


def _task_id(task_id: object) -> str:
    return _short_text(task_id, "task_id", MAX_ID_CHARS)


def _int_in_range(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{name} must be a whole number from {low} to {high}.")
    if not low <= value <= high:
        raise InvalidInput(f"{name} must be from {low} to {high}; got {value}.")
    return value


def _priority(value: Priority | str) -> Priority:
    try:
        return Priority(value)
    except ValueError:
        raise InvalidInput(
            f"priority must be one of high, medium, low; got {_clip(str(value), 40)!r}."
        ) from None


def _status(value: TaskStatus | str) -> TaskStatus:
    try:
        return TaskStatus(value)
    except ValueError:
        names = ", ".join(s.value for s in TaskStatus)
        raise InvalidInput(f"status must be one of {names}; got {_clip(str(value), 40)!r}.") from None


def _tags(tags: Sequence[str]) -> list[str]:
    if isinstance(tags, str):
        raise InvalidInput('tags must be a list of strings, e.g. ["backend", "urgent"].')
    # A dict: ordered, and a repeated tag costs one lookup (a list scan made a long list quadratic).
    clean: dict[str, None] = {}
    for raw in tags:
        # Trimmed before the length check: the limit is on the tag as stored.
        clean[_short_text(raw.strip() if isinstance(raw, str) else raw, "each tag", MAX_TAG_CHARS)] = None
        if len(clean) > MAX_TAGS:  # stop at once: the rest of a huge list is never looked at
            raise InvalidInput(f"at most {MAX_TAGS} different tags are allowed.")
    return list(clean)


def _check_json(value: Any) -> None:  # noqa: PLR0912 - one flat type switch reads best
    """Reject what the engines would store differently: NUL, lone surrogates, NaN, huge ints, depth."""
    # depth: how many objects and arrays enclose the item (a leaf is no level of its own).
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth == MAX_JSON_DEPTH and isinstance(item, dict | list):
            raise InvalidInput(f"result nests objects and arrays deeper than {MAX_JSON_DEPTH} levels.")
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise InvalidInput("result object keys must be strings.")
                _json_string(key)
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            _json_string(item)
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int):
            if not -(2**63) <= item < 2**63:
                raise InvalidInput("result numbers must fit in 64 bits.")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidInput("result numbers must be finite (no NaN or Infinity).")
        else:
            raise InvalidInput("result must contain only JSON values.")


def _json_string(value: str) -> None:
    if "\x00" in value:
        raise InvalidInput("result must not contain NUL (\\u0000) characters.")
    _utf8(value, "result")


def _found(task: Task | None, task_id: str) -> Task:
    if task is None:
        raise TaskNotFound(task_id)
    return task


def _refusal(task: Task, worker: str, action: str) -> TaskOrchestratorError:
    """Why ``worker`` may not ``action`` the task as it is now."""
    task_id = task.task_id
    if task.status is TaskStatus.IN_PROGRESS and task.worker_id != worker:
        return NotLeaseHolder(
            f"Cannot {action} task {task_id}: it is held by worker {task.worker_id!r}, not {worker!r}. "
            "Your lease may have expired and the task been claimed again; drop this task."
        )
    if task.status is TaskStatus.IN_PROGRESS:  # held by this worker again: it changed under the call
        return InvalidTransition(f"Task {task_id} changed while you tried to {action} it; retry.")
    if task.status is TaskStatus.PENDING:
        return NotLeaseHolder(
            f"Cannot {action} task {task_id}: it is pending, not held by anyone"
            + (
                f" (back in the queue after attempt {task.attempts}: its lease ran out, or a failure "
                "was reported with retry)"
                if task.attempts
                else ""
            )
            + ". Acquire a task first."
        )
    return InvalidTransition(f"Cannot {action} task {task_id}: it is already {task.status.value}.")


def _release(to: TaskStatus, now: datetime, error: str | None) -> dict[str, Any]:
    """Column values for a task leaving in_progress for pending (retry) or failed (final).

    A pending task has no holder; a failed one keeps the worker it failed with.
    """
    values: dict[str, Any] = {"status": to.value, "error": error, "updated_at": now, "lease_expires_at": None}
    if to is TaskStatus.FAILED:
        values["completed_at"] = now
    else:
        values["worker_id"] = None
    return values


def _new_task_id(now: datetime) -> str:
    # Milliseconds first so ids sort roughly by creation; 64 random bits make collisions negligible.
    return f"{int(now.timestamp() * 1000):012x}{secrets.token_hex(8)}"


def _list_filter(
    work_directory: str | None,
    status: TaskStatus | str | None,
    priority: Priority | str | None,
    tags: Sequence[str],
) -> ListFilter:
    return ListFilter(
        work_directory=None if work_directory is None else normalise_directory(work_directory),
        status=None if status is None else _status(status),
        priority=None if priority is None else _priority(priority),
        # Sorted: "having all of these tags" does not depend on their order, and filters compare equal.
        tags=tuple(sorted(_tags(tags))),
    )


# Room for the longest filters a cursor can carry: a 2 kB directory and 32 tags of 64 characters, as
# UTF-8 JSON (a control character escapes to 6 bytes), then base64.
_MAX_CURSOR_CHARS = 65_536


def _encode_cursor(created_at: datetime, task_id: str, flt: ListFilter) -> str:
    filters = {
        "d": flt.work_directory,
        "s": None if flt.status is None else flt.status.value,
        "p": None if flt.priority is None else flt.priority.value,
        "t": list(flt.tags),
    }
    text = json.dumps([created_at.isoformat(), task_id, filters], separators=(",", ":"), ensure_ascii=False)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[tuple[datetime, str], ListFilter | None]:
    """The position after which the next page starts, and the filters of the listing it came from
    (None in a cursor from before cursors carried them)."""
    bad = InvalidInput("cursor is not valid; pass the next_cursor of a previous list_tasks call unchanged.")
    if not isinstance(cursor, str) or not cursor or len(cursor) > _MAX_CURSOR_CHARS:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_text, task_id, *rest = json.loads(raw)
        created = datetime.fromisoformat(created_text)
        if created.tzinfo is None or len(rest) > 1:
            raise bad
        # A forged offset next to datetime.min/max overflows on conversion; catch it here, not in SQL.
        created = created.astimezone(UTC)
        # JSON escapes can smuggle in lone surrogates, which no driver can encode.
        task_id = _task_id(task_id)
        carried = None
        if rest:
            filters = rest[0]
            if not isinstance(filters, dict) or not isinstance(filters.get("t"), list):
                raise bad
            # Through the same checks as the arguments: a forged cursor gets no further than they do.
            carried = _list_filter(filters.get("d"), filters.get("s"), filters.get("p"), filters["t"])
    except (
        binascii.Error,
        ValueError,
        TypeError,
        UnicodeDecodeError,
        OverflowError,
        RecursionError,  # deeply nested JSON in a forged cursor
        InvalidInput,
    ):
        raise bad from None
    return (created, task_id), carried


def _clip(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _iso(value: datetime | None) -> str | None:
    """A time inside history details, written as every other time the tools return: UTC, with Z."""
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")
