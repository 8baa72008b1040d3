"""The race: many real server processes on one database, every task claimed and completed exactly once.

Each worker is an SDK client driving its own ``python -m task_orchestrator_mcp`` over stdio (all the
clients share this test's event loop; the servers are separate processes, as in production). The
tasks exist before the servers start; all workers then race to claim and complete until every
directory is empty. Exactly-once is checked from the tool results and from task_history.
"""

from __future__ import annotations

import random
import time
from collections import Counter

import anyio
import pytest
from mcp import Client

from task_orchestrator_mcp.db.engine import Database
from task_orchestrator_mcp.db.migrate import ensure_schema
from task_orchestrator_mcp.service import TaskService
from tests.e2e.processes import call, connect, history, run_clients, server_pids
from tests.support import server_params, structured

# engine -> (server processes, tasks, directories)
SIZES = {"sqlite": (8, 400, 2), "postgres": (16, 1000, 4)}
PRIORITIES = ("high", "medium", "low")

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def _directory(index: int) -> str:
    return f"/race/project-{index}"


def _create_tasks(database_url: str, plan: list[tuple[str, str]]) -> dict[str, str]:
    database = Database(database_url)
    try:
        ensure_schema(database)
        service = TaskService(database)
        return {
            service.create_task(directory, f"race task {k}", priority).task_id: directory
            for k, (directory, priority) in enumerate(plan)
        }
    finally:
        database.dispose()


async def test_every_task_is_claimed_and_completed_exactly_once(engine_name: str, database_url: str) -> None:
    """N servers, M tasks over D directories: every task claimed once and completed once, by its holder."""
    servers, total, directories = SIZES[engine_name]
    rng = random.Random(total)
    plan = [(_directory(k % directories), PRIORITIES[rng.randrange(3)]) for k in range(total)]

    # The planner's side is not what races: the tasks are created in this process, beforehand.
    created = await anyio.to_thread.run_sync(_create_tasks, database_url, plan)
    claims: list[list[str]] = [[] for _ in range(servers)]  # per worker, the task ids it acquired
    worker_ids: list[str | None] = [None] * servers
    completed: dict[str, str] = {}  # task_id -> worker_id reported by complete_task
    pids: set[int] = set()

    async def drain(index: int, client: Client) -> None:
        # Each worker walks the directories from a different starting point, and keeps asking each
        # one until it answers {"task": null}: nothing is created meanwhile, so null means empty.
        active = [_directory((index + d) % directories) for d in range(directories)]
        turn = 0
        while active:
            directory = active[turn % len(active)]
            turn += 1
            acquired = structured(await call(client, "acquire_task", {"work_directory": directory}))
            task = acquired["task"]
            if task is None:
                active.remove(directory)
                continue
            assert task["status"] == "in_progress"
            assert task["work_directory"] == directory
            assert task["attempts"] == 1
            if worker_ids[index] is None:
                worker_ids[index] = task["worker_id"]
            assert task["worker_id"] == worker_ids[index]
            claims[index].append(task["task_id"])
            done = structured(
                await call(
                    client,
                    "complete_task",
                    {"task_id": task["task_id"], "result": {"worker": index, "ok": True}},
                )
            )
            assert done["status"] == "completed"
            assert done["result"] == {"worker": index, "ok": True}
            completed[done["task_id"]] = done["worker_id"]

    started = drained = 0.0
    drained_count = 0

    async def worker(index: int, client: Client) -> None:
        nonlocal started, drained, drained_count
        if index == 0:
            pids.update(server_pids())
            started = time.perf_counter()
        await drain(index, client)
        drained_count += 1
        if drained_count == servers:
            drained = time.perf_counter() - started

    await run_clients([server_params(database_url) for _ in range(servers)], worker)
    print(
        f"\n{engine_name}: {servers} servers, {total} tasks over {directories} directories: "
        f"acquire+complete {drained:.2f}s ({total / drained:.0f} tasks/s, {2 * total / drained:.0f} "
        f"calls/s); tasks per worker {sorted(len(c) for c in claims)}"
    )

    # Every server was its own process, with its own default worker id.
    assert len(pids) == servers
    assert len(set(worker_ids) - {None}) == len([c for c in claims if c])

    # From the tool results: each task acquired by exactly one worker, and completed by it.
    all_claims = [task_id for per_worker in claims for task_id in per_worker]
    doubles = [task_id for task_id, n in Counter(all_claims).items() if n > 1]
    assert doubles == [], f"{len(doubles)} tasks were claimed twice"
    assert len(created) == total
    assert set(all_claims) == set(created)
    holder = {task_id: worker_ids[i] for i, per_worker in enumerate(claims) for task_id in per_worker}
    assert completed == holder
    # It was a race: more than one worker got work.
    assert sum(1 for per_worker in claims if per_worker) > 1

    # From the database: the rows, and one claim and one completion per task in the history.
    with connect(database_url) as conn:
        rows = conn.exec_driver_sql("SELECT id, status, attempts, worker_id FROM tasks").all()
        changes = history(conn)
    assert {row[0] for row in rows} == set(created)
    assert {(row[1], row[2]) for row in rows} == {("completed", 1)}
    assert {row[0]: row[3] for row in rows} == holder
    assert set(changes) == set(created)
    for task_id, steps in changes.items():
        assert steps == [
            (None, "pending", None),
            ("pending", "in_progress", holder[task_id]),
            ("in_progress", "completed", holder[task_id]),
        ], task_id
