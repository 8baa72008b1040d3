"""Start-up: many servers at once on a database that does not exist yet, and the fast path at head."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import anyio
import pytest
from mcp import Client
from sqlalchemy import inspect
from sqlalchemy.engine import make_url

from task_orchestrator_mcp.db.migrate import HEAD_REVISION
from task_orchestrator_mcp.db.tables import metadata
from tests.e2e.processes import call, connect, run_clients, server_pids
from tests.support import run_server_once, server_env, server_params, structured

SERVERS = 8
# Alembic's own INFO line for each migration it applies (routed into the server's log file).
UPGRADE_LOG = re.compile(rf"Running upgrade\s+-> {HEAD_REVISION}\b")
# `python -X importtime` writes one line per module imported: "import time: self | cumulative | name".
_IMPORTED = re.compile(r"^import time:\s*\d+\s*\|\s*\d+\s*\|\s*(\S+)\s*$", re.M)


def _not_yet_created(engine_name: str, database_url: str) -> str:
    """SQLite: a file in a directory that does not exist yet; PostgreSQL: the fixture's empty database."""
    if engine_name != "sqlite":
        return database_url
    path = Path(str(make_url(database_url).database)).parent / "not-yet" / "created" / "tasks.db"
    assert not path.parent.exists()
    return f"sqlite:///{path}"


@pytest.mark.slow
@pytest.mark.anyio
async def test_concurrent_cold_start_creates_the_schema_once(
    engine_name: str, database_url: str, tmp_path: Path
) -> None:
    """8 servers spawned at once on no database all serve, and exactly one of them ran the migration."""
    url = _not_yet_created(engine_name, database_url)
    logs = [tmp_path / f"server-{i}.log" for i in range(SERVERS)]
    params = [
        server_params(url, TASK_ORCHESTRATOR_LOG_LEVEL="INFO", TASK_ORCHESTRATOR_LOG_FILE=str(log))
        for log in logs
    ]
    pids: set[int] = set()

    async def worker(index: int, client: Client) -> None:
        if index == 0:
            pids.update(server_pids())
        assert client.server_info is not None
        assert client.server_info.name == "task-orchestrator"
        tools = {tool.name for tool in (await client.list_tools()).tools}
        assert {"create_task", "acquire_task", "complete_task", "list_tasks"} <= tools
        task = structured(
            await call(client, "create_task", {"work_directory": "/cold", "prompt": f"from server {index}"})
        )
        assert task["status"] == "pending"

    await run_clients(params, worker)

    assert len(pids) == SERVERS
    with connect(url) as conn:
        versions = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all()
        tables = set(inspect(conn).get_table_names())
        created = conn.exec_driver_sql("SELECT count(*) FROM tasks").scalar_one()
    assert versions == [HEAD_REVISION]
    assert set(metadata.tables) | {"alembic_version"} <= tables
    assert created == SERVERS
    upgraded = [log.name for log in logs if UPGRADE_LOG.search(log.read_text())]
    assert len(upgraded) == 1, f"servers that ran the migration: {upgraded}"


def _start_and_stop(database_url: str) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    """Run the real entry point under ``-X importtime`` with stdin at EOF (it starts, then stops).

    Returns every module it imported, and the finished process.
    """
    finished = run_server_once(server_env(database_url), python_flags=("-X", "importtime"))
    return set(_IMPORTED.findall(finished.stderr)), finished


def _alembic(modules: set[str]) -> set[str]:
    return {name for name in modules if name == "alembic" or name.startswith("alembic.")}


@pytest.mark.anyio
async def test_start_up_at_head_does_not_import_alembic(database_url: str) -> None:
    """The first start (empty database) migrates with Alembic; the next one, at head, never imports it."""
    modules, first = await anyio.to_thread.run_sync(_start_and_stop, database_url)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout == ""  # nothing but the protocol on stdout, and no client spoke
    assert "task_orchestrator_mcp.server" in modules  # the detector sees our own imports...
    assert _alembic(modules), "an empty database must be migrated with Alembic"  # ...and Alembic's

    modules, second = await anyio.to_thread.run_sync(_start_and_stop, database_url)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout == ""
    assert "task_orchestrator_mcp.db.migrate" in modules
    assert _alembic(modules) == set()
