"""Helpers for the multi-process end-to-end tests: many real servers at once, their pids, the history."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import anyio
import psutil
from mcp import Client, StdioServerParameters
from sqlalchemy import Connection, NullPool, create_engine, text

# Generous bounds: they only turn a hang into a failure, they never decide a pass.
RUN_DEADLINE = 300.0
CALL_DEADLINE = 60.0

Worker = Callable[[int, Client], Awaitable[None]]


def server_pids() -> set[int]:
    """The pids of the live ``python -m task_orchestrator_mcp`` processes this test process spawned."""
    pids = set()
    for child in psutil.Process().children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "task_orchestrator_mcp" in child.cmdline():
                pids.add(child.pid)
        except psutil.NoSuchProcess:
            continue
    return pids


async def run_clients(
    params: Sequence[StdioServerParameters], worker: Worker, *, deadline: float = RUN_DEADLINE
) -> None:
    """Spawn one real server per entry of ``params``, all at once, each with its own SDK client.

    When every client has finished ``initialize``, ``worker(index, client)`` runs for all of them
    concurrently; the servers are shut down when every worker has returned. Fails after ``deadline``
    seconds instead of hanging.
    """
    ready = 0
    all_ready = anyio.Event()

    async def one(index: int) -> None:
        nonlocal ready
        async with Client(params[index], mode="legacy") as client:
            ready += 1
            if ready == len(params):
                all_ready.set()
            await all_ready.wait()
            await worker(index, client)

    with anyio.fail_after(deadline):
        async with anyio.create_task_group() as tg:
            for index in range(len(params)):
                tg.start_soon(one, index)


async def call(client: Client, tool: str, arguments: dict[str, Any]) -> Any:
    """Call a tool, failing (rather than hanging) if no answer comes within :data:`CALL_DEADLINE`."""
    with anyio.fail_after(CALL_DEADLINE):
        return await client.call_tool(tool, arguments)


@contextmanager
def connect(database_url: str) -> Iterator[Connection]:
    """A plain connection to the test database, to check what the servers wrote (no pool kept)."""
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def history(conn: Connection) -> dict[str, list[tuple[str | None, str, str | None]]]:
    """Every task's status changes in order: ``{task_id: [(from, to, worker_id), ...]}``."""
    rows = conn.execute(
        text("SELECT task_id, from_status, to_status, worker_id FROM task_history ORDER BY id")
    ).all()
    out: dict[str, list[tuple[str | None, str, str | None]]] = {}
    for task_id, from_status, to_status, worker_id in rows:
        out.setdefault(task_id, []).append((from_status, to_status, worker_id))
    return out
