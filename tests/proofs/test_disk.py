"""Disk trouble proof: a read-only database, a read-only directory, a file-size limit, a full disk.

In every case the caller gets an isError whose sentence says what is wrong (not the SDK's bare
"Error executing tool X", no driver text), the server keeps serving reads, nothing already stored is
lost or half-written, and writing resumes once the cause is gone:

- read-only database (SQLite: the file is chmod 0444; PostgreSQL: ``default_transaction_read_only``):
  the same server process resumes once it is writable again (its pooled connections are recycled).
- read-only directory (SQLite cannot create its -wal/-shm files): the server refuses to start with one
  clear line and exit code 1; a server started after the fix serves everything.
- ``RLIMIT_FSIZE`` (works everywhere, no privileges): writes past the limit fail with EFBIG. A file-size
  limit belongs to a process, so "space returns" means a server started without it; it sees it all.
- a real full disk (a 2 MiB tmpfs, only where mounting is allowed, e.g. as root): the same server
  process resumes as soon as space is freed.

Root ignores file modes, so as root the server is started through ``limited_server.py``, which drops
CAP_DAC_OVERRIDE from its bounding set: the modes then bind root too.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from sqlalchemy.engine import make_url

from task_orchestrator_mcp.db.engine import Database
from task_orchestrator_mcp.db.migrate import ensure_schema
from task_orchestrator_mcp.service import TaskService
from tests.support import (
    error_text,
    postgres_read_only,
    server_env,
    server_params,
    sqlite_integrity_ok,
    structured,
)

LAUNCHER = Path(__file__).with_name("limited_server.py")
SERVER = [sys.executable, "-m", "task_orchestrator_mcp"]
START_DEADLINE = 120.0
# Words no agent-facing message may carry: driver and SDK internals.
LEAKS = ("sqlite3", "psycopg", "OperationalError", "Traceback", "INSERT", "UPDATE ")


def limited_params(database_url: str, *, fsize: int | None = None) -> StdioServerParameters:
    """The real server, spawned through the launcher: file modes bind even for root; optional fsize."""
    args = [str(LAUNCHER), "--no-dac-override"]
    if fsize is not None:
        args.append(f"--fsize={fsize}")
    return StdioServerParameters(
        command=sys.executable, args=[*args, "--", *SERVER], env=server_env(database_url)
    )


def assert_clear(message: str, *words: str) -> None:
    """An agent-facing error: our sentence after the SDK's prefix, naming the cause, no internals."""
    prefix, _, sentence = message.partition(": ")
    assert prefix.startswith("Error executing tool "), message
    assert sentence.strip(), f"only the SDK's generic text: {message!r}"
    assert "nothing was changed" in sentence, message
    for word in words:
        assert word in sentence, message
    for leak in LEAKS:
        assert leak not in sentence, message


def seed(database_url: str) -> dict[str, Any]:
    """Store a completed task and a pending one; return them as the service acknowledged them."""
    db = Database(database_url)
    try:
        ensure_schema(db)
        service = TaskService(db, worker_id="seeder")
        done = service.create_task("/disk", "finished before the trouble")
        service.acquire_task("/disk")
        service.complete_task(done.task_id, {"kept": True})
        pending = service.create_task("/disk", "pending before the trouble")
        return {
            "done": service.get_task(done.task_id).model_dump(mode="json"),
            "pending": service.get_task(pending.task_id).model_dump(mode="json"),
        }
    finally:
        db.dispose()  # the last connection checkpoints: the data is in the main file now


async def assert_stored(client: Client, stored: dict[str, Any]) -> None:
    """Everything stored before the trouble reads back exactly as it was acknowledged."""
    for task in stored.values():
        now = structured(await client.call_tool("get_task", {"task_id": task["task_id"]}))
        assert now == task


def can_drop_dac_override(tmp_path: Path) -> bool:
    """Whether the launcher can make file modes bind (always, unless root lacks CAP_SETPCAP)."""
    probe = tmp_path / "probe"
    probe.write_text("")
    probe.chmod(0o444)
    result = subprocess.run(
        [
            sys.executable,
            str(LAUNCHER),
            "--no-dac-override",
            "--",
            sys.executable,
            "-c",
            f"open({str(probe)!r}, 'a')",
        ],
        capture_output=True,
        timeout=START_DEADLINE,
        check=False,
    )
    probe.chmod(0o644)
    return result.returncode != 0 and b"PermissionError" in result.stderr


# -- read-only database ---------------------------------------------------------------------------


@contextmanager
def read_only(database_url: str, tmp_path: Path) -> Iterator[Any]:
    """Make the database read-only; the yielded callable makes it writable again (the operator's fix)."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if not can_drop_dac_override(tmp_path):
            pytest.skip("running as root without CAP_SETPCAP: file modes cannot be made to bind")
        assert url.database is not None
        path = Path(url.database)
        path.chmod(0o444)

        def writable() -> None:
            # SQLite gave the -wal and -shm files it created the database file's (read-only) mode:
            # the fix is `chmod u+w tasks.db*`, not just the main file.
            for file in path.parent.glob(path.name + "*"):
                file.chmod(0o644)

        try:
            yield writable
        finally:
            writable()
        return

    # Every new session is read-only, as on a hot standby or a primary that was demoted.
    with postgres_read_only(database_url) as writable_again:
        yield writable_again


@pytest.mark.anyio
async def test_read_only_database_refuses_writes_clearly_then_resumes(
    database_url: str, tmp_path: Path
) -> None:
    """Writes get a clear isError, reads work, nothing changes; the same server resumes after the fix."""
    stored = seed(database_url)
    with read_only(database_url, tmp_path) as make_writable:
        async with Client(limited_params(database_url), mode="legacy") as client:
            await assert_stored(client, stored)
            for tool, args in (
                ("create_task", {"work_directory": "/disk", "prompt": "refused"}),
                ("acquire_task", {"work_directory": "/disk", "worker_id": "w"}),
                ("cancel_task", {"task_id": stored["pending"]["task_id"]}),
            ):
                result = await client.call_tool(tool, args)
                assert_clear(error_text(result), "read-only")
            await assert_stored(client, stored)  # the refused calls changed nothing
            page = structured(await client.call_tool("list_tasks", {}))
            assert len(page["tasks"]) == 2

            make_writable()
            # The same process resumes without a restart. A connection opened while the database was
            # read-only stays read-only: its first write is refused once more and recycles the pool,
            # so a caller sees at most one more refusal (the message said: retry once it is writable).
            args = {"work_directory": "/disk", "prompt": "resumed"}
            first = await client.call_tool("create_task", args)
            if first.is_error:
                assert_clear(error_text(first), "read-only")
                structured(await client.call_tool("create_task", args))
            got = structured(
                await client.call_tool("acquire_task", {"work_directory": "/disk", "worker_id": "w"})
            )
            assert got["task"]["task_id"] == stored["pending"]["task_id"]
            done = structured(
                await client.call_tool(
                    "complete_task", {"task_id": got["task"]["task_id"], "result": "ok", "worker_id": "w"}
                )
            )
            assert done["status"] == "completed"
            assert (
                structured(await client.call_tool("get_task", {"task_id": stored["done"]["task_id"]}))
                == (stored["done"])
            )
    if make_url(database_url).get_backend_name() == "sqlite":
        sqlite_integrity_ok(database_url)


def test_read_only_directory_stops_the_server_with_one_clear_line(tmp_path: Path) -> None:
    """SQLite cannot create its -wal/-shm files: exit 1, one line naming the database, then recovery."""
    if not can_drop_dac_override(tmp_path):
        pytest.skip("running as root without CAP_SETPCAP: file modes cannot be made to bind")
    folder = tmp_path / "db"
    folder.mkdir()
    url = f"sqlite:///{folder / 'tasks.db'}"
    stored = seed(url)
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    try:
        result = subprocess.run(
            [sys.executable, str(LAUNCHER), "--no-dac-override", "--", *SERVER],
            env=server_env(url),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=START_DEADLINE,
            check=False,
        )
    finally:
        folder.chmod(0o755)
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert result.stdout == b""  # nothing on the protocol channel
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("task-orchestrator-mcp: cannot use the database sqlite:///"), stderr
    assert "Traceback" not in stderr

    # With the directory writable again, a new server serves all of it.
    db = Database(url)
    try:
        service = TaskService(db)
        for task in stored.values():
            assert service.get_task(task["task_id"]).model_dump(mode="json") == task
    finally:
        db.dispose()
    sqlite_integrity_ok(url)


# -- the disk fills up ----------------------------------------------------------------------------


async def fill_until_refused(client: Client, prompt_bytes: int, max_calls: int = 200) -> list[str]:
    """create_task with big prompts until the disk refuses one; the ids acknowledged before that."""
    acknowledged: list[str] = []
    for n in range(max_calls):
        result = await client.call_tool(
            "create_task", {"work_directory": "/disk", "prompt": f"{n} " + "x" * prompt_bytes}
        )
        if result.is_error:
            assert_clear(error_text(result), "disk is full")
            return acknowledged
        acknowledged.append(structured(result)["task_id"])
    pytest.fail(f"the disk never filled up in {max_calls} writes")


async def assert_reading_intact(client: Client, stored: dict[str, Any], acknowledged: list[str]) -> None:
    """While the disk is full, reads serve everything acknowledged, and nothing else is there."""
    await assert_stored(client, stored)
    for task_id in acknowledged:
        assert structured(await client.call_tool("get_task", {"task_id": task_id}))["status"] == "pending"
    page = structured(await client.call_tool("list_tasks", {"limit": 200}))
    # Exactly what was acknowledged: the refused writes left no row behind.
    assert len(page["tasks"]) == len(stored) + len(acknowledged)


async def work_resumes(client: Client, acknowledged: list[str]) -> None:
    """A write, a claim and a completion all go through."""
    structured(await client.call_tool("create_task", {"work_directory": "/disk", "prompt": "after"}))
    got = structured(await client.call_tool("acquire_task", {"work_directory": "/disk", "worker_id": "w"}))
    assert got["task"] is not None
    structured(
        await client.call_tool(
            "complete_task", {"task_id": got["task"]["task_id"], "result": "ok", "worker_id": "w"}
        )
    )
    page = structured(await client.call_tool("list_tasks", {"limit": 200}))
    assert {t["task_id"] for t in page["tasks"]} >= set(acknowledged)


@pytest.mark.anyio
async def test_file_size_limit_refuses_writes_clearly_and_loses_nothing(tmp_path: Path) -> None:
    """RLIMIT_FSIZE: past the limit every write is refused clearly, reads go on; without it, all resumes."""
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    stored = seed(url)
    # Room for a few 20 KB prompts in the write-ahead log, then EFBIG.
    limit = (tmp_path / "tasks.db").stat().st_size + 128 * 1024
    async with Client(limited_params(url, fsize=limit), mode="legacy") as client:
        acknowledged = await fill_until_refused(client, prompt_bytes=20_000)
        assert acknowledged, "the limit left no room at all: the test proves nothing"
        # The write-ahead log is at the limit: even a small write or a claim is refused now.
        for tool, args in (
            ("create_task", {"work_directory": "/disk", "prompt": "small"}),
            ("acquire_task", {"work_directory": "/disk", "worker_id": "w"}),
        ):
            assert_clear(error_text(await client.call_tool(tool, args)), "disk is full")
        await assert_reading_intact(client, stored, acknowledged)
    # A file-size limit belongs to the process: "space returns" is a server started without it.
    async with Client(server_params(url), mode="legacy") as client:
        await assert_stored(client, stored)
        await work_resumes(client, acknowledged)
    sqlite_integrity_ok(url)


@contextmanager
def small_tmpfs(mount_point: Path, size: str) -> Iterator[None]:
    """A tmpfs of ``size`` at ``mount_point``, or a skip where mounting is not allowed."""
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip() or mounted.returncode}")
    try:
        yield
    finally:
        # Lazy: a straggling server process must not keep the mount alive past the test.
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.anyio
async def test_full_disk_refuses_writes_clearly_then_resumes_in_the_same_process(tmp_path: Path) -> None:
    """A real ENOSPC on a 2 MiB tmpfs: clear refusals, nothing lost, the same server resumes."""
    disk = tmp_path / "disk"
    with small_tmpfs(disk, "2m"):
        url = f"sqlite:///{disk / 'tasks.db'}"
        stored = seed(url)
        async with Client(server_params(url), mode="legacy") as client:
            ballast = disk / "ballast"
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            # Leave about 100 KiB: a few writes succeed, then the disk is full.
            with ballast.open("wb") as handle:
                handle.write(b"\0" * max(free - 100 * 1024, 0))
            acknowledged = await fill_until_refused(client, prompt_bytes=20_000)
            # (A small write might still fit in log space the refused one left: not asserted here.)
            await assert_reading_intact(client, stored, acknowledged)

            ballast.unlink()  # space returns
            await work_resumes(client, acknowledged)
            await assert_stored(client, {"done": stored["done"]})
        sqlite_integrity_ok(url)
