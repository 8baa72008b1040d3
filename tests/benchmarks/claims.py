"""Part 3, claim throughput: W worker processes drain one directory, each claim followed by a complete.

Three ways, each W in its own processes: a raw driver loop (the floor: SQLite ``BEGIN IMMEDIATE`` +
``UPDATE ... WHERE id = (SELECT ...) RETURNING *`` + the history ``INSERT``; PostgreSQL the same with
``FOR UPDATE SKIP LOCKED``, the history row written in the same statement by a data-modifying
``WITH``, as the service does), the TaskService directly, and end to end through one stdio server per
worker.

The floor does what the tools promise: the claim and the complete each hand back the task row (a
worker needs its prompt; ``acquire_task`` and ``complete_task`` return the Task), each writes its
history row, and a complete that matches no held task counts as an error. Until 2026-11-30 the floor
returned only the id (``RETURNING id``): about a quarter fewer instructions per pair than with the
row, a cost the service cannot avoid under its contract (README, Benchmarks); and on PostgreSQL it
wrote the history row in a second statement, a round trip more than the service.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import shutil
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text

from task_orchestrator_mcp.db.engine import Database
from task_orchestrator_mcp.db.migrate import ensure_schema
from tests.benchmarks.common import (
    SQLITE_TIME,
    Result,
    Workspace,
    load_tasks,
    percentile,
    sqlite_url,
    task_rows,
)

DIRECTORY = "/bench/claims"
MAX_ERRORS = 200
# More tasks than any run drains in its time budget.
QUEUE = 20_000
# (worker index, claimed ids, errors, finish time on the shared monotonic clock, seconds per call:
# each acquire and each complete; each transaction for the raw loops)
Report = tuple[int, list[str], int, float, list[float]]

_SQLITE_CLAIM = """
UPDATE tasks SET status = 'in_progress', worker_id = ?, attempts = attempts + 1,
  started_at = ?, updated_at = ?, lease_expires_at = ?, lease_seconds = 900
WHERE id = (SELECT id FROM tasks WHERE work_directory = ? AND status = 'pending'
            ORDER BY priority, created_at, id LIMIT 1) AND status = 'pending'
RETURNING *"""
_SQLITE_DONE = """
UPDATE tasks SET status = 'completed', result = '"done"', updated_at = ?, completed_at = ?,
  lease_expires_at = NULL WHERE id = ? AND status = 'in_progress' AND worker_id = ?
RETURNING *"""
_SQLITE_HISTORY = (
    "INSERT INTO task_history (task_id, from_status, to_status, worker_id, at) VALUES (?,?,?,?,?)"
)

# PostgreSQL runs data-modifying WITH clauses: the change and its history row in one statement, one
# round trip, as the service does it.
_PG_CLAIM = """
WITH c AS (
  UPDATE tasks SET status = 'in_progress', worker_id = %(w)s, attempts = attempts + 1,
    started_at = %(now)s, updated_at = %(now)s, lease_expires_at = %(until)s, lease_seconds = 900
  WHERE id = (SELECT id FROM tasks WHERE work_directory = %(dir)s AND status = 'pending'
              ORDER BY priority, created_at, id LIMIT 1 FOR UPDATE SKIP LOCKED) AND status = 'pending'
  RETURNING *),
h AS (INSERT INTO task_history (task_id, from_status, to_status, worker_id, at)
      SELECT id, 'pending', 'in_progress', worker_id, started_at FROM c)
SELECT * FROM c"""
_PG_DONE = """
WITH c AS (
  UPDATE tasks SET status = 'completed', result = '"done"', updated_at = %(now)s, completed_at = %(now)s,
    lease_expires_at = NULL WHERE id = %(id)s AND status = 'in_progress' AND worker_id = %(w)s
  RETURNING *),
h AS (INSERT INTO task_history (task_id, from_status, to_status, worker_id, at)
      SELECT id, 'in_progress', 'completed', worker_id, updated_at FROM c)
SELECT * FROM c"""


def _raw_sqlite_worker(index: int, url: str, barrier: Any, out: Any, seconds: float) -> None:
    import sqlite3

    conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None, timeout=30)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA wal_autocheckpoint = 4000")  # as the service's engine sets it
    worker = f"raw-{index}"
    claimed: list[str] = []
    calls: list[float] = []
    errors = 0
    barrier.wait()
    deadline = time.monotonic() + seconds
    while errors < MAX_ERRORS and time.monotonic() < deadline:
        now = datetime.now(UTC).replace(tzinfo=None)
        stamp, lease = now.strftime(SQLITE_TIME), (now + timedelta(seconds=900)).strftime(SQLITE_TIME)
        try:
            started = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(_SQLITE_CLAIM, (worker, stamp, stamp, lease, DIRECTORY)).fetchone()
            if row is not None:
                conn.execute(_SQLITE_HISTORY, (row[0], "pending", "in_progress", worker, stamp))
            conn.execute("COMMIT")
            calls.append(time.perf_counter() - started)
            if row is None:
                break
            started = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            if conn.execute(_SQLITE_DONE, (stamp, stamp, row[0], worker)).fetchone() is None:
                raise sqlite3.Error("the complete matched no task held by this worker")
            conn.execute(_SQLITE_HISTORY, (row[0], "in_progress", "completed", worker, stamp))
            conn.execute("COMMIT")
            calls.append(time.perf_counter() - started)
            claimed.append(row[0])
        except sqlite3.Error:
            errors += 1
            if conn.in_transaction:
                conn.execute("ROLLBACK")
    out.put((index, claimed, errors, time.monotonic(), calls))


def _raw_pg_worker(index: int, url: str, barrier: Any, out: Any, seconds: float) -> None:
    import psycopg

    conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)
    worker = f"raw-{index}"
    claimed: list[str] = []
    calls: list[float] = []
    errors = 0
    barrier.wait()
    deadline = time.monotonic() + seconds
    while errors < MAX_ERRORS and time.monotonic() < deadline:
        now = datetime.now(UTC)
        try:
            started = time.perf_counter()
            with conn.transaction():
                claim = {"w": worker, "now": now, "until": now + timedelta(seconds=900), "dir": DIRECTORY}
                row = conn.execute(_PG_CLAIM, claim).fetchone()
            calls.append(time.perf_counter() - started)
            if row is None:
                break
            started = time.perf_counter()
            with conn.transaction():
                if conn.execute(_PG_DONE, {"w": worker, "now": now, "id": row[0]}).fetchone() is None:
                    raise psycopg.Error("the complete matched no task held by this worker")
            calls.append(time.perf_counter() - started)
            claimed.append(row[0])
        except psycopg.Error:
            errors += 1
    out.put((index, claimed, errors, time.monotonic(), calls))


def _service_worker(index: int, url: str, barrier: Any, out: Any, seconds: float) -> None:
    from task_orchestrator_mcp.service import TaskService

    database = Database(url)
    service = TaskService(database, worker_id=f"svc-{index}")
    claimed: list[str] = []
    calls: list[float] = []
    errors = 0
    barrier.wait()
    deadline = time.monotonic() + seconds
    while errors < MAX_ERRORS and time.monotonic() < deadline:
        try:
            started = time.perf_counter()
            task = service.acquire_task(DIRECTORY)
            calls.append(time.perf_counter() - started)
            if task is None:
                break
            started = time.perf_counter()
            service.complete_task(task.task_id, "done")
            calls.append(time.perf_counter() - started)
            claimed.append(task.task_id)
        except Exception:
            errors += 1
    finished = time.monotonic()
    database.dispose()
    out.put((index, claimed, errors, finished, calls))


def _e2e_worker(index: int, url: str, barrier: Any, out: Any, seconds: float) -> None:
    from mcp import Client

    from tests.support import server_params

    async def main() -> tuple[list[str], int, list[float], float]:
        claimed: list[str] = []
        calls: list[float] = []
        errors = 0
        async with Client(server_params(url, TASK_ORCHESTRATOR_WORKER_ID=f"e2e-{index}"), mode="legacy") as c:
            # The server answers the handshake while its database opens; one read waits for that, so
            # the timed window measures claims, not start-up.
            await c.call_tool("list_tasks", {"limit": 1})
            barrier.wait()  # blocks the loop, on purpose: nothing else runs in this process yet
            deadline = time.monotonic() + seconds
            while errors < MAX_ERRORS and time.monotonic() < deadline:
                started = time.perf_counter()
                got = await c.call_tool("acquire_task", {"work_directory": DIRECTORY})
                calls.append(time.perf_counter() - started)
                if got.is_error or got.structured_content is None:
                    errors += 1
                    continue
                task = got.structured_content["task"]
                if task is None:
                    break
                started = time.perf_counter()
                done = await c.call_tool("complete_task", {"task_id": task["task_id"], "result": "done"})
                calls.append(time.perf_counter() - started)
                if done.is_error:
                    errors += 1
                    continue
                claimed.append(task["task_id"])
            # Done claiming: closing the client and its server is not part of the throughput.
            return claimed, errors, calls, time.monotonic()

    claimed, errors, calls, finished = asyncio.run(main())
    out.put((index, claimed, errors, finished, calls))


WORKERS = {
    "raw sqlite3": _raw_sqlite_worker,
    "raw psycopg": _raw_pg_worker,
    "service": _service_worker,
    "e2e stdio": _e2e_worker,
}


def drain(kind: str, url: str, workers: int, seconds: float) -> dict[str, Any]:
    """Run ``workers`` processes of ``kind`` for ``seconds`` (or until the directory is empty):
    throughput, and exactness (double claims in the workers' reports and in the history, errors,
    claimed tasks left uncompleted)."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(workers + 1)
    out = ctx.Queue()
    procs = [ctx.Process(target=WORKERS[kind], args=(i, url, barrier, out, seconds)) for i in range(workers)]
    try:
        for proc in procs:
            proc.start()
        barrier.wait(timeout=300)
        started = time.monotonic()
        reports: list[Report] = [out.get(timeout=600) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
    finally:  # a worker that failed to report, or an interrupted run: no process outlives the run
        barrier.abort()
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    finished = max(report[3] for report in reports)
    ids = Counter(task_id for report in reports for task_id in report[1])
    errors = sum(report[2] for report in reports)
    database = Database(url)
    try:
        with database.read() as conn:
            claims_in_history = conn.execute(
                text(
                    "SELECT COUNT(*) - COUNT(DISTINCT task_id) FROM task_history "
                    "WHERE to_status = 'in_progress'"
                )
            ).scalar_one()
            not_completed = conn.execute(
                text("SELECT COUNT(*) FROM tasks WHERE work_directory = :d AND status = 'in_progress'"),
                {"d": DIRECTORY},
            ).scalar_one()
    finally:
        database.dispose()
    calls = sorted(seconds for report in reports for seconds in report[4])
    return {
        # How long one call (or raw transaction) took, waits for the write lock included.
        "call_ms": {q: percentile(calls, q) * 1000 for q in (50, 99, 99.9)} | {"max": calls[-1] * 1000},
        "per_s": sum(ids.values()) / (finished - started),
        "seconds": finished - started,
        "claimed": sum(ids.values()),
        "double_claims": sum(n - 1 for n in ids.values() if n > 1) + int(claims_in_history),
        "errors": errors,
        "not_completed": int(not_completed),
        "seconds_budget": seconds,
    }


_TEMPLATES: dict[int, Path] = {}


def _fresh_sqlite(ws: Workspace, tasks: int) -> str:
    # Loaded once, then copied: a file copy is far cheaper than inserting the queue again.
    if tasks not in _TEMPLATES:
        path = ws.migrated_copy(f"claims-template-{tasks}")
        load_tasks(sqlite_url(path), task_rows(tasks, DIRECTORY))
        _TEMPLATES[tasks] = path
    path = ws.migrated_copy("claims")
    shutil.copyfile(_TEMPLATES[tasks], path)
    return sqlite_url(path)


def _reset_postgres(url: str, tasks: int) -> str:
    database = Database(url)
    try:
        ensure_schema(database)
        with database.write() as conn:
            conn.execute(text("TRUNCATE task_history, task_tags, tasks"))
    finally:
        database.dispose()
    load_tasks(url, task_rows(tasks, DIRECTORY))
    return url


def _row(engine: str, kind: str, w: int, got: dict[str, Any], floor: dict[str, Any] | None) -> Result:
    exact = got["double_claims"] == 0 and got["errors"] == 0 and got["not_completed"] == 0
    is_goal = kind == "service"
    ok: bool | None = exact
    if is_goal and floor is not None:
        ok = exact and got["per_s"] / floor["per_s"] >= 0.7
    return Result(
        f"claims ({engine})",
        f"{kind} W={w}",
        "claims/s",
        got["per_s"],
        None if floor is None else floor["per_s"],
        ">= 0.7x, exact" if is_goal else "exact",
        ok,
        got,
    )


def run(
    ws: Workspace,
    *,
    worker_counts: list[int],
    seconds: float,
    rounds: int,
    e2e: bool = True,
    postgres_url: str | None = None,
) -> list[Result]:
    """Throughput of each kind at each W as a ratio of the raw floor; double claims and errors counted.

    Each kind runs ``rounds`` times, alternating with the floor (noise hits both alike); the median
    round counts. Every run starts from a fresh queue with more tasks than it can drain.
    """
    results = []
    engines: list[tuple[str, str]] = [("sqlite", "raw sqlite3")]
    if postgres_url:
        engines.append(("postgresql", "raw psycopg"))
    kinds_of = {"sqlite": ["service"], "postgresql": ["service"]}
    for engine, floor_kind in engines:
        for w in worker_counts:
            kinds = [floor_kind, *kinds_of[engine], *(["e2e stdio"] if e2e else [])]
            runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
            for _ in range(rounds):
                for kind in kinds:
                    url = (
                        _fresh_sqlite(ws, QUEUE)
                        if engine == "sqlite"
                        else _reset_postgres(postgres_url or "", QUEUE)
                    )
                    runs[kind].append(drain(kind, url, w, seconds))
            merged = {kind: _median_run(found) for kind, found in runs.items()}
            floor = merged[floor_kind]
            for kind in kinds:
                results.append(_row(engine, kind, w, merged[kind], None if kind == floor_kind else floor))
    return results


def _median_run(found: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(found, key=lambda run: float(run["per_s"]))
    chosen = dict(ordered[len(ordered) // 2])
    # Exactness counts over every round, not only the median one.
    for key in ("double_claims", "errors", "not_completed"):
        chosen[key] = sum(int(run[key]) for run in found)
    chosen["rounds_per_s"] = [run["per_s"] for run in found]
    return chosen
