"""Crash proof: 8 workers race over 1,000 tasks while a chaos loop kill -9's their servers.

Each worker (``crash_worker.py``) is its own process that spawns the real server over stdio with the
SDK client, acquires with a short lease, completes at once, and records every completion the server
acknowledged. A chaos loop here kill -9's a random live server every 100-400 ms; the worker starts a
new one and carries on. Killed mid-call, a server may have committed a claim whose answer never
arrived: that task stays in progress until its lease ends and then goes to another claim.

In the end every task is completed exactly once (one ``-> completed`` history row, nothing left
pending or in progress), every acknowledged completion is in the database with its worker and
result, nobody was acknowledged twice for one task, and SQLite's ``PRAGMA integrity_check`` is ok.

Knobs (environment): ``TASK_ORCHESTRATOR_CRASH_TASKS`` (default 1000, the contract),
``TASK_ORCHESTRATOR_CRASH_SEED`` (random seed of the chaos loop).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from loguru import logger
from sqlalchemy import event, func, select, text

from task_orchestrator_mcp.db.engine import Database
from task_orchestrator_mcp.db.migrate import ensure_schema
from task_orchestrator_mcp.db.tables import task_history, tasks
from task_orchestrator_mcp.service import MAX_ATTEMPTS_LIMIT, TaskService
from tests.support import REPO_ROOT

pytestmark = pytest.mark.slow

WORKERS = 8
TASKS = int(os.environ.get("TASK_ORCHESTRATOR_CRASH_TASKS", "1000"))
DIRECTORIES = [f"/proofs/crash/dir-{n}" for n in range(4)]
# Short enough that work orphaned by a kill comes back quickly, long enough that a live worker
# (16 busy processes on 2 cores) still completes inside it almost always.
LEASE_SECONDS = 2
# A kill comes after a random pause in this range (seconds), and only ever hits a server that is
# serving (past initialize): killing servers still importing mcp would only starve the machine,
# since each start costs 0.6-1.5 s of CPU, most of it importing mcp.
CHAOS_PAUSE = tuple(float(x) for x in os.environ.get("TASK_ORCHESTRATOR_CRASH_PAUSE", "0.2,0.8").split(","))
MIN_SERVING = WORKERS // 2
# The whole run must end well within this; a hung worker fails the test instead of hanging CI.
RUN_DEADLINE_SECONDS = 240.0


@dataclass
class Run:
    """What the chaos run measured."""

    kills: int
    seconds: float
    worker_stats: list[dict[str, Any]]
    acks: list[dict[str, Any]]


def _seed(database_url: str) -> None:
    # Seeding is set-up, not the subject: no fsync per task (SQLite synchronous=NORMAL, PostgreSQL
    # synchronous_commit=off, both for these connections only) and no debug line per task.
    db = Database(database_url, sqlite_synchronous="NORMAL")
    if not db.is_sqlite:
        event.listen(db.engine, "connect", _no_synchronous_commit)
    try:
        ensure_schema(db)
        service = TaskService(db, worker_id="planner")
        logger.disable("task_orchestrator_mcp")
        for n in range(TASKS):
            service.create_task(
                DIRECTORIES[n % len(DIRECTORIES)],
                f"crash task {n}",
                priority=("high", "medium", "low")[n % 3],
                # Kills can cost a task several claims; it must never fail for lack of attempts.
                max_attempts=MAX_ATTEMPTS_LIMIT,
            )
    finally:
        logger.enable("task_orchestrator_mcp")
        db.dispose()


def _no_synchronous_commit(dbapi_conn: Any, _record: Any) -> None:
    with dbapi_conn.cursor() as cur:
        cur.execute("SET synchronous_commit TO off")
    dbapi_conn.commit()


def _serving_servers(workers: list[subprocess.Popen[bytes]], work: Path) -> list[psutil.Process]:
    """The servers that got past initialize, as their workers announced them (see crash_worker.py)."""
    servers = []
    for index, worker in enumerate(workers):
        try:
            pid = int((work / f"ready-{index}").read_text())
            server = psutil.Process(pid)
            # Guard against a reused pid: it must still be this worker's server.
            if server.ppid() == worker.pid and server.status() != psutil.STATUS_ZOMBIE:
                servers.append(server)
        except (FileNotFoundError, ValueError, psutil.NoSuchProcess):
            continue
    return servers


def _chaos_run(database_url: str, work: Path, seed: int) -> Run:
    acks_file, errors_file = work / "acks.jsonl", work / "errors.txt"
    workers: list[subprocess.Popen[bytes]] = []
    outputs = []
    started = time.monotonic()
    try:
        for index in range(WORKERS):
            out = (work / f"worker-{index}.out").open("wb")
            err = (work / f"worker-{index}.err").open("wb")
            outputs += [out, err]
            workers.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tests.proofs.crash_worker",
                        f"--url={database_url}",
                        f"--worker-id=crash-worker-{index}",
                        f"--index={index}",
                        f"--directories={','.join(DIRECTORIES)}",
                        f"--lease={LEASE_SECONDS}",
                        f"--deadline={RUN_DEADLINE_SECONDS}",
                        f"--acks={acks_file}",
                        f"--errors={errors_file}",
                        f"--ready={work / f'ready-{index}'}",
                    ],
                    cwd=REPO_ROOT,
                    stdout=out,
                    stderr=err,
                )
            )
        rng = random.Random(seed)
        kills = 0
        killed: set[int] = set()
        # The loop ends when every worker has drained the queue (or the deadline fails the test).
        while any(worker.poll() is None for worker in workers):
            assert time.monotonic() - started < RUN_DEADLINE_SECONDS + 30, "workers did not finish"
            time.sleep(rng.uniform(*CHAOS_PAUSE))  # the chaos pace, not a synchronisation
            servers = [s for s in _serving_servers(workers, work) if s.pid not in killed]
            # Kill only while at least half the workers are served: on a slow or crowded machine the
            # kills then wait for restarts instead of starving every server of CPU (a death spiral).
            if len(servers) >= MIN_SERVING:
                victim = rng.choice(servers)
                try:
                    victim.kill()  # SIGKILL: no clean-up of any kind
                    kills += 1
                    killed.add(victim.pid)
                except psutil.NoSuchProcess:
                    pass
        seconds = time.monotonic() - started
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
            worker.wait()
        for handle in outputs:
            handle.close()
    for index, worker in enumerate(workers):
        stderr_tail = (work / f"worker-{index}.err").read_text(errors="replace")[-2000:]
        assert worker.returncode == 0, f"worker {index} exited {worker.returncode}:\n{stderr_tail}"
    errors = errors_file.read_text() if errors_file.exists() else ""
    assert not errors, f"workers saw unexpected tool errors:\n{errors}"
    stats = [json.loads((work / f"worker-{i}.out").read_text().splitlines()[-1]) for i in range(WORKERS)]
    acks = [json.loads(line) for line in acks_file.read_text().splitlines()] if acks_file.exists() else []
    return Run(kills=kills, seconds=seconds, worker_stats=stats, acks=acks)


def _check_database(database_url: str, run: Run) -> dict[str, int]:
    db = Database(database_url)
    try:
        with db.read() as conn:
            rows = {r.id: r for r in conn.execute(select(tasks))}
            status_counts = Counter(r.status for r in rows.values())
            history = conn.execute(
                select(task_history.c.task_id, task_history.c.to_status, task_history.c.worker_id).order_by(
                    task_history.c.id
                )
            ).all()
            orphans = conn.execute(
                select(func.count())
                .select_from(task_history)
                .where(task_history.c.task_id.not_in(select(tasks.c.id)))
            ).scalar_one()
            integrity = (
                conn.execute(text("PRAGMA integrity_check")).scalars().all() if db.is_sqlite else ["ok"]
            )
    finally:
        db.dispose()

    assert len(rows) == TASKS
    assert status_counts == {"completed": TASKS}, status_counts
    assert integrity == ["ok"], integrity
    assert orphans == 0

    completions: Counter[str] = Counter()
    claims: Counter[str] = Counter()
    completed_by: dict[str, str | None] = {}
    for task_id, to_status, worker_id in history:
        if to_status == "completed":
            completions[task_id] += 1
            completed_by[task_id] = worker_id
        elif to_status == "in_progress":
            claims[task_id] += 1
    assert set(completions) == set(rows), "a task has no completion in its history"
    assert max(completions.values()) == 1, [t for t, n in completions.items() if n > 1]
    for task_id, row in rows.items():
        # The completing worker is the holder on record, and every claim counted one attempt.
        assert completed_by[task_id] == row.worker_id
        assert claims[task_id] == row.attempts >= 1

    acked: Counter[str] = Counter(ack["task_id"] for ack in run.acks)
    assert not [t for t, n in acked.items() if n > 1], "a task was acknowledged as completed twice"
    for ack in run.acks:
        row = rows[ack["task_id"]]
        assert (row.worker_id, row.result) == (ack["worker"], ack["result"]), ack
    return {
        "reclaimed_tasks": sum(1 for n in claims.values() if n > 1),
        "claims": sum(claims.values()),
        "unacknowledged_completions": TASKS - len(acked),
    }


def test_kill_9_chaos_loses_and_duplicates_nothing(
    database_url: str, engine_name: str, tmp_path: Path, record_property: Any
) -> None:
    """8 workers, 1,000 tasks, servers kill -9'd every few hundred ms: each task completed exactly once."""
    _seed(database_url)
    seed = int(os.environ.get("TASK_ORCHESTRATOR_CRASH_SEED", str(random.randrange(2**32))))
    run = _chaos_run(database_url, tmp_path, seed)
    facts = _check_database(database_url, run)

    starts = sum(s["servers_started"] for s in run.worker_stats)
    summary = {
        "engine": engine_name,
        "seed": seed,
        "tasks": TASKS,
        "kills": run.kills,
        "servers_started": starts,
        "acks": len(run.acks),
        "seconds": round(run.seconds, 1),
        **facts,
    }
    for key, value in summary.items():
        record_property(key, value)
    # Shown by `pytest -rP` / `-s`: the numbers the issue asks to report.
    print("crash-proof", json.dumps(summary))
    # The chaos must really have happened, or this proved nothing.
    assert run.kills >= 10, summary
    assert starts > WORKERS, summary
