"""PostgreSQL going away and coming back, under running servers; and no PostgreSQL at all at start.

The restart test stops and starts the local cluster (``pg_ctlcluster``): anything else using that
PostgreSQL sees a few seconds of outage. It always starts the cluster again, pass or fail.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from sqlalchemy import NullPool, create_engine, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from tests.e2e.processes import call, connect, run_clients, server_pids
from tests.support import (
    fresh_postgres_database,
    postgres_admin_url,
    run_server_once,
    server_env,
    server_params,
    structured,
)

SERVERS = 3
UNAVAILABLE = "database is unavailable"
RECOVERY_DEADLINE = 60.0
_ETC = Path("/etc/postgresql")


def _cluster_version() -> str:
    versions = sorted(_ETC.iterdir()) if _ETC.is_dir() else []
    if not versions or shutil.which("pg_ctlcluster") is None:
        pytest.skip("no local PostgreSQL cluster to restart (pg_ctlcluster, /etc/postgresql)")
    return versions[-1].name


def _pg_ctl(version: str, action: str) -> None:
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action],
        check=True,
        capture_output=True,
        timeout=120,
    )


def _accepting(admin_url: str) -> bool:
    engine = create_engine(admin_url, poolclass=NullPool, connect_args={"connect_timeout": 2})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except sa_exc.OperationalError:
        return False
    finally:
        engine.dispose()


@contextmanager
def _cluster_running_afterwards(version: str, admin_url: str) -> Iterator[None]:
    """Whatever happens inside, leave PostgreSQL started and accepting connections."""
    try:
        yield
    finally:
        if not _accepting(admin_url):
            subprocess.run(
                ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
                capture_output=True,
                timeout=120,
                check=False,
            )
            deadline = time.monotonic() + RECOVERY_DEADLINE
            while not _accepting(admin_url) and time.monotonic() < deadline:
                time.sleep(0.2)


def _is_unavailable(result: Any) -> bool:
    text_ = " ".join(getattr(block, "text", "") for block in result.content)
    return bool(result.is_error) and UNAVAILABLE in text_.lower()


@pytest.mark.postgres
@pytest.mark.slow
@pytest.mark.anyio
async def test_servers_survive_a_postgres_restart() -> None:
    """During the outage every call is a clear "unavailable" error; afterwards the same processes serve."""
    admin_url = postgres_admin_url()
    assert admin_url is not None
    version = _cluster_version()

    with _cluster_running_afterwards(version, admin_url), fresh_postgres_database(admin_url) as url:
        await _restart_under_load(url, version)


async def _restart_under_load(url: str, version: str) -> None:
    held: dict[int, tuple[str, str]] = {}  # worker -> (task id it holds across the restart, worker id)
    pids_before: set[int] = set()
    pids_after: set[int] = set()
    background_acks: list[str] = []
    outage_errors: list[str] = []
    arrived = 0
    down = anyio.Event()
    probed = 0
    up = anyio.Event()
    recovered = 0
    all_recovered = anyio.Event()
    restarted_count = 0
    restarted = anyio.Event()

    async def background(index: int, client: Client) -> None:
        # Calls in flight while PostgreSQL stops and starts: each one answers, ok or "unavailable".
        n = refused = 0
        while not all_recovered.is_set():
            result = await call(
                client, "create_task", {"work_directory": "/restart/load", "prompt": f"load {index}-{n}"}
            )
            n += 1
            if result.is_error:
                refused += 1
                if not _is_unavailable(result):
                    outage_errors.append(str(result.content))
                await anyio.sleep(0.05)  # pacing while down, not synchronisation
            else:
                background_acks.append(structured(result)["task_id"])
        print(f"\nbackground {index}: {n} calls, {refused} answered 'unavailable'")

    async def worker(index: int, client: Client) -> None:
        nonlocal arrived, probed, recovered, restarted_count
        directory = f"/restart/worker-{index}"
        structured(await call(client, "create_task", {"work_directory": directory, "prompt": "held"}))
        task = structured(await call(client, "acquire_task", {"work_directory": directory}))["task"]
        held[index] = (task["task_id"], task["worker_id"])

        async with anyio.create_task_group() as tg:
            tg.start_soon(background, index, client)
            arrived += 1
            if arrived == SERVERS:
                pids_before.update(server_pids())
                await anyio.to_thread.run_sync(_pg_ctl, version, "stop")
                down.set()
            await down.wait()

            # PostgreSQL is down: a clear, typed error for every kind of call, and the server lives on.
            for tool, arguments in [
                ("create_task", {"work_directory": directory, "prompt": "during the outage"}),
                ("acquire_task", {"work_directory": directory}),
                ("get_task", {"task_id": held[index][0]}),
                ("list_tasks", {"work_directory": directory}),
                ("complete_task", {"task_id": held[index][0], "result": "too early"}),
            ]:
                result = await call(client, tool, arguments)
                assert _is_unavailable(result), f"{tool} during the outage: {result.content}"

            probed += 1
            if probed == SERVERS:
                await anyio.to_thread.run_sync(_pg_ctl, version, "start")
                up.set()
            await up.wait()

            # Back up: the same process reconnects by itself (poll until then, bounded).
            with anyio.fail_after(RECOVERY_DEADLINE):
                while True:
                    result = await call(client, "get_task", {"task_id": held[index][0]})
                    if not result.is_error:
                        break
                    assert _is_unavailable(result), result.content
                    await anyio.sleep(0.1)
            task_id, worker_id = held[index]
            after = structured(result)
            assert (after["status"], after["worker_id"]) == ("in_progress", worker_id)
            # The lease survived, and this process's default worker id is still the holder.
            done = structured(await call(client, "complete_task", {"task_id": task_id, "result": "ok"}))
            assert done["status"] == "completed"
            structured(await call(client, "create_task", {"work_directory": directory, "prompt": "again"}))
            again = structured(await call(client, "acquire_task", {"work_directory": directory}))["task"]
            assert again is not None
            assert again["worker_id"] == worker_id

            recovered += 1
            if recovered == SERVERS:
                all_recovered.set()
            await all_recovered.wait()

        # A plain restart with nobody calling: every pooled connection is now dead, and pre-ping
        # must replace it unseen, so the very first call after the restart already succeeds.
        restarted_count += 1
        if restarted_count == SERVERS:
            await anyio.to_thread.run_sync(_pg_ctl, version, "restart")
            pids_after.update(server_pids())
            restarted.set()
        await restarted.wait()
        first = await call(client, "get_task", {"task_id": held[index][0]})
        assert structured(first)["status"] == "completed"

    await run_clients([server_params(url) for _ in range(SERVERS)], worker)

    assert outage_errors == [], "calls during the restart failed with something other than 'unavailable'"
    assert len(pids_before) == SERVERS
    assert pids_after == pids_before, "the servers were not the same processes after the restart"
    with connect(url) as conn:
        stored = set(conn.exec_driver_sql("SELECT id FROM tasks").scalars())
    assert set(background_acks) <= stored


def _assert_one_line_failure(finished: subprocess.CompletedProcess[str], shown_url: str) -> str:
    assert finished.returncode != 0
    assert finished.stdout == ""
    lines = finished.stderr.splitlines()
    assert len(lines) == 1, finished.stderr
    assert lines[0].startswith(f"task-orchestrator-mcp: cannot use the database {shown_url}")
    assert "Traceback" not in finished.stderr
    return lines[0]


def test_unreachable_postgres_at_start_is_one_line_and_non_zero_exit() -> None:
    """Nothing listens at the URL: one line on stderr naming the database, and a non-zero exit."""
    pytest.importorskip("psycopg")
    url = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"
    line = _assert_one_line_failure(run_server_once(server_env(url)), url)
    assert "refused" in line.lower()


@pytest.mark.postgres
def test_missing_postgres_database_at_start_is_one_line_and_non_zero_exit() -> None:
    """The server is up but the database does not exist: the same one-line failure."""
    admin_url = postgres_admin_url()
    assert admin_url is not None
    url = make_url(admin_url).set(database=f"tom_missing_{secrets.token_hex(4)}")
    finished = run_server_once(server_env(url.render_as_string(hide_password=False)))
    line = _assert_one_line_failure(finished, url.render_as_string(hide_password=True))
    assert "does not exist" in line
