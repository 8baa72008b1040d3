"""Part 4, scale: acquire and list_tasks at the service layer with 10k..1M tasks in the table.

Rows are bulk-loaded straight into the migrated schema (indexes dropped during the load and rebuilt
from their own DDL): 88% completed, 10% pending, 1% failed, 1% in progress (lease in the future), one
history row each. Every directory holds a thousand tasks in that same mix, so at every size each timed
acquire finds pending work (a claim, not an empty look) in the directory it asks for.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from task_orchestrator_mcp.db.engine import Database, DriverConnection
from task_orchestrator_mcp.service import TaskService
from tests.benchmarks.common import SQLITE_TIME, Result, Workspace, percentile, sqlite_url

TASKS_PER_DIRECTORY = 1000


def directory(index: int) -> str:
    """The work directory of the index-th block of tasks."""
    return f"/bench/scale/project-{index:05d}"


def bulk_load(path: Path, count: int) -> None:
    """Fill ``tasks`` and ``task_history`` with ``count`` tasks as fast as SQLite allows."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA cache_size = -200000")
    indexes = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
        "AND tbl_name IN ('tasks', 'task_history')"
    ).fetchall()
    conn.execute("BEGIN")
    for name, _sql in indexes:
        conn.execute(f'DROP INDEX "{name}"')
    base = datetime(2025, 1, 1)
    future = (datetime.now(UTC).replace(tzinfo=None) + timedelta(days=3650)).strftime(SQLITE_TIME)
    directories = max(1, count // TASKS_PER_DIRECTORY)

    def rows() -> Any:
        for i in range(count):
            at = (base + timedelta(milliseconds=i * 10)).strftime(SQLITE_TIME)
            slot = i % 100
            status = (
                "pending"
                if slot < 10
                else "failed"
                if slot == 10
                else "in_progress"
                if slot == 11
                else "completed"
            )
            lease = future if status == "in_progress" else None
            yield (
                f"s{i:011d}",
                # Blocks of 100 consecutive rows (every status slot) per directory, round robin.
                directory((i // 100) % directories),
                f"scale task {i}: refactor module {i % 97} and run its tests",
                i % 3,
                "[]",
                status,
                None if status == "pending" else "loader",
                0 if status == "pending" else 1,
                3,
                '"done"' if status == "completed" else None,
                at,
                at,
                lease,
                None if status != "in_progress" else 900,
            )

    conn.executemany(
        "INSERT INTO tasks (id, work_directory, prompt, priority, tags, status, worker_id, attempts, "
        "max_attempts, result, created_at, updated_at, lease_expires_at, lease_seconds) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        rows(),
    )
    conn.execute(
        "INSERT INTO task_history (task_id, from_status, to_status, worker_id, at) "
        "SELECT id, NULL, 'pending', NULL, created_at FROM tasks"
    )
    for _name, sql in indexes:
        conn.execute(sql)
    conn.execute("COMMIT")
    conn.close()
    # Written with synchronous=OFF: flush it now, or the first fsync of the timed calls (a checkpoint's)
    # pays for writing out the whole load.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _capture(action: Any) -> list[tuple[str, Any]]:
    """The SELECT/UPDATE statements (and parameters) the service runs on its driver connections."""
    seen: list[tuple[str, Any]] = []
    original = DriverConnection.execute

    def recording(self: DriverConnection, sql: str, params: Any = ()) -> Any:
        if sql.lstrip().upper().startswith(("SELECT", "UPDATE")):
            seen.append((sql, params))
        return original(self, sql, params)

    DriverConnection.execute = recording  # type: ignore[method-assign]
    try:
        action()
    finally:
        DriverConnection.execute = original  # type: ignore[method-assign]
    return seen


def query_plans(path: Path, service: TaskService, directories: int) -> list[str]:
    """EXPLAIN QUERY PLAN of every SELECT/UPDATE that one acquire and two list calls really run."""
    statements = _capture(
        lambda: (
            service.acquire_task(directory(1 % directories)),
            service.list_tasks(directory(2 % directories), None, None, None, 50, None),
            service.list_tasks(None, "pending", None, None, 50, None),
        ),
    )
    conn = sqlite3.connect(path)
    lines = []
    if not statements:
        raise RuntimeError("no statements captured for the query plans")
    for statement, parameters in statements:
        lines.append("  " + " ".join(statement.split())[:160])
        for row in conn.execute("EXPLAIN QUERY PLAN " + statement, parameters):
            lines.append(f"      {row[-1]}")
    conn.close()
    return lines


def _timed(action: Any, count: int) -> list[float]:
    samples = []
    for i in range(count):
        started = time.perf_counter()
        action(i)
        samples.append(time.perf_counter() - started)
    return samples


def measure(ws: Workspace, count: int, calls: int, plans: bool) -> dict[str, Any]:
    """Load ``count`` tasks, then time acquire and list calls on random directories."""
    path = ws.migrated_copy(f"scale-{count}")
    started = time.perf_counter()
    bulk_load(path, count)
    load_seconds = time.perf_counter() - started
    directories = max(1, count // TASKS_PER_DIRECTORY)
    rng = random.Random(count)
    database = Database(sqlite_url(path))
    service = TaskService(database, worker_id="scale-bench")
    try:
        # Warm the pool and the statement caches, as a running server would be.
        for i in range(20):
            service.list_tasks(directory(i % directories), None, None, None, 50, None)
        picks = [rng.randrange(directories) for _ in range(calls)]
        claimed: list[bool] = []
        acquire = _timed(
            lambda i: claimed.append(service.acquire_task(directory(picks[i])) is not None), calls
        )
        if not all(claimed):  # an empty look is far cheaper than a claim: it would flatter the ratio
            raise RuntimeError(f"{claimed.count(False)} of {calls} acquires found nothing at {count:,} tasks")
        by_dir = _timed(lambda i: service.list_tasks(directory(picks[i]), None, None, None, 50, None), calls)
        by_status = _timed(lambda _i: service.list_tasks(None, "pending", None, None, 50, None), calls)
        # A new service: its first acquire runs the look for expired leases, which a running
        # service skips while no lease can have ended, so its plan is shown too.
        fresh = TaskService(database, worker_id="scale-plans")
        plan = query_plans(path, fresh, directories) if plans else []
    finally:
        database.dispose()
    path.unlink()
    return {
        "load_seconds": load_seconds,
        "acquire": acquire,
        "list_tasks dir": by_dir,
        "list_tasks status": by_status,
        "plan": plan,
    }


def run(ws: Workspace, *, sizes: list[int], calls: int, rounds: int = 1) -> tuple[list[Result], list[str]]:
    """p50/p99 of each call at every size; the largest size's p99 against the smallest's.

    Each round loads every size afresh and times ``calls`` calls of each kind; the rounds' samples
    are pooled, so p99 is read from ``rounds * calls`` calls. Sizes alternate within a round, so a
    noisy moment hits them alike.
    """
    measured: dict[int, dict[str, Any]] = {}
    for r in range(rounds):
        for n in sizes:
            got = measure(ws, n, calls, plans=n == sizes[-1] and r == rounds - 1)
            if n not in measured:
                measured[n] = got
                continue
            for op in ("acquire", "list_tasks dir", "list_tasks status"):
                measured[n][op] += got[op]
            measured[n]["load_seconds"] += got["load_seconds"]
            measured[n]["plan"] = got["plan"] or measured[n]["plan"]
    smallest = sizes[0]
    results = []
    for op in ("acquire", "list_tasks dir", "list_tasks status"):
        for n in sizes:
            for q in (50, 99):
                value = percentile(measured[n][op], q) * 1000
                base = percentile(measured[smallest][op], q) * 1000
                goal = q == 99 and n == sizes[-1] and n != smallest
                results.append(
                    Result(
                        "scale",
                        f"{op} p{q} @ {n:,} (floor: @ {smallest:,})",
                        "ms",
                        value,
                        base,
                        "<= 2x" if goal else "",
                        (value / base <= 2) if goal else None,
                        {"calls": calls * rounds, "load_seconds": measured[n]["load_seconds"]},
                    )
                )
    plan = measured[sizes[-1]]["plan"]
    if plan:
        results.append(plan_check(plan, sizes[-1]))
    return results, plan


def plan_check(plan: list[str], size: int) -> Result:
    """The goal's "the query plans use the indexes", checked: no step of any plan reads a whole
    table or index (``SCAN``) or sorts rows (``USE TEMP B-TREE``)."""
    steps = [line.strip() for line in plan if line.startswith("      ")]  # plan steps, not the SQL
    bad = [step for step in steps if step.startswith("SCAN ") or "TEMP B-TREE" in step]
    return Result(
        "scale",
        f"query plan steps that scan or sort @ {size:,} (of {len(steps)})",
        "",
        len(bad),
        None,
        "none",
        not bad,
        {"bad_steps": bad},
    )
