"""kill -9 of a server mid-stream loses no acknowledged write, and leaves a sound database behind."""

from __future__ import annotations

import os
import random
import signal

import anyio
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from task_orchestrator_mcp.db.engine import Database
from task_orchestrator_mcp.models import Task
from task_orchestrator_mcp.service import TaskService
from tests.e2e.processes import CALL_DEADLINE, connect, history, run_clients, server_pids
from tests.support import server_params, structured

# Calls kept in flight on the one connection, so the kill lands while writes are under way.
IN_FLIGHT = 4
# The connection's failure modes once its server is dead.
_GONE = (MCPError, anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def test_kill_9_mid_stream_loses_no_acknowledged_create(engine_name: str, database_url: str) -> None:
    """Create tasks as fast as one client can; SIGKILL the server after a random number of answers."""
    seed = random.randrange(1 << 32)
    kill_after = random.Random(seed).randint(20, 250)
    acknowledged: dict[str, str] = {}  # task_id -> prompt, from every create_task that returned
    sent: set[str] = set()
    killed = anyio.Event()
    reached = anyio.Event()
    victims: list[int] = []

    async def create_loop(client: Client, loop: int) -> None:
        n = 0
        while not killed.is_set():
            prompt = f"kill test {loop}-{n}"
            n += 1
            sent.add(prompt)
            try:
                with anyio.fail_after(CALL_DEADLINE):
                    result = await client.call_tool(
                        "create_task", {"work_directory": "/kill/project", "prompt": prompt}
                    )
            except _GONE:
                assert killed.is_set(), "the connection failed before the server was killed"
                return
            task = structured(result)
            acknowledged[task["task_id"]] = prompt
            if len(acknowledged) >= kill_after:
                reached.set()

    async def killer() -> None:
        await reached.wait()
        (pid,) = server_pids()
        victims.append(pid)
        killed.set()
        os.kill(pid, signal.SIGKILL)

    async def worker(_index: int, client: Client) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(killer)
            for loop in range(IN_FLIGHT):
                tg.start_soon(create_loop, client, loop)

    await run_clients([server_params(database_url)], worker)
    assert victims, "the server was never killed"

    with connect(database_url) as conn:
        stored: dict[str, str] = dict(conn.exec_driver_sql("SELECT id, prompt FROM tasks").all())
        changes = history(conn)
        integrity = (
            conn.exec_driver_sql("PRAGMA integrity_check").scalars().all() if engine_name == "sqlite" else []
        )
    context = f"seed {seed}: killed after {kill_after} acknowledgements"
    print(f"\n{engine_name}: {context}; {len(sent)} sent, {len(acknowledged)} acked, {len(stored)} stored")
    lost = {task_id for task_id in acknowledged if stored.get(task_id) != acknowledged[task_id]}
    assert lost == set(), f"{context}: acknowledged creates missing after kill -9: {sorted(lost)}"
    # At most the calls in flight at the kill may have committed without an answer; nothing else.
    assert set(stored.values()) <= sent, context
    assert len(stored) - len(acknowledged) <= IN_FLIGHT, context
    # Every stored task came with its history row: the transaction was all or nothing.
    assert dict(changes) == {task_id: [(None, "pending", None)] for task_id in stored}, context
    if engine_name == "sqlite":
        assert integrity == ["ok"], context

    # The database takes new writes at once (SQLite: the hot WAL left by the kill is recovered).
    task = await anyio.to_thread.run_sync(_create_after_kill, database_url)
    assert task.status.value == "pending"


def _create_after_kill(database_url: str) -> Task:
    database = Database(database_url)
    try:
        return TaskService(database).create_task("/kill/project", "after the kill")
    finally:
        database.dispose()
