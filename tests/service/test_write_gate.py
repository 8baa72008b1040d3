"""SQLite's write gate: a writer that loses the lock for STARVING_AFTER_MS closes the gate and gets
its turn; writers wait while the gate is closed, never past their busy timeout; a dead holder opens
it; SQLAlchemy's transactions and the service's reads keep the full busy timeout."""

from __future__ import annotations

import errno
import fcntl
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
from sqlalchemy import text

from task_orchestrator_mcp.db.engine import Database
from task_orchestrator_mcp.db.migrate import ensure_schema
from task_orchestrator_mcp.db.write_gate import STARVING_AFTER_MS
from task_orchestrator_mcp.errors import DatabaseUnavailable
from task_orchestrator_mcp.service import TaskService
from tests.support import wait_for_the_write_gate


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "tasks.db"
    db = Database(f"sqlite:///{path}")
    ensure_schema(db)
    db.dispose()
    return path


@contextmanager
def _database(path: Path, *, busy_timeout_ms: int = 30_000, pool_size: int = 4) -> Iterator[Database]:
    db = Database(f"sqlite:///{path}", busy_timeout_ms=busy_timeout_ms, pool_size=pool_size)
    try:
        yield db
    finally:
        db.dispose()


@contextmanager
def _gate_closed(path: Path) -> Iterator[None]:
    """Hold the gate closed, as a starving writer of another process does."""
    fd = os.open(f"{path}-lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def _task_count(path: Path) -> int:
    with closing(sqlite3.connect(path)) as conn:
        count: int = conn.execute("SELECT count(*) FROM tasks").fetchone()[0]
    return count


@contextmanager
def _lock_held_for(path: Path, seconds: float) -> Iterator[None]:
    """Another connection holds SQLite's write lock for ``seconds`` from the start of the block."""
    with closing(sqlite3.connect(path, isolation_level=None, check_same_thread=False)) as other:
        other.execute("BEGIN IMMEDIATE")
        timer = threading.Timer(seconds, other.rollback)
        timer.start()
        try:
            yield
        finally:
            timer.join()


def _when_the_gate_closes(path: Path, then: threading.Event) -> threading.Thread:
    """A thread that sets ``then`` once someone has closed the gate (within 30 s)."""

    def watch() -> None:
        try:
            wait_for_the_write_gate(path)
        finally:
            then.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    return watcher


def test_the_gate_file_lies_beside_the_database(db_path: Path) -> None:
    with _database(db_path) as db:
        assert db.write_gate is not None
        TaskService(db).create_task("/repo", "x")
    assert (db_path.parent / "tasks.db-lock").exists()


def test_a_writer_kept_from_the_lock_past_the_budget_closes_the_gate_and_gets_its_turn(
    db_path: Path,
) -> None:
    """Another connection holds the write lock until the service's write has given up on the busy
    handler and closed the gate; the write then commits, and the gate is open again."""
    holding = threading.Event()
    release = threading.Event()

    def hold_lock() -> None:
        with closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
            conn.execute("BEGIN IMMEDIATE")
            holding.set()
            release.wait(timeout=30)
            conn.execute("COMMIT")

    holder = threading.Thread(target=hold_lock)
    holder.start()
    holding.wait(timeout=30)
    watcher = _when_the_gate_closes(db_path, then=release)
    try:
        with _database(db_path) as db:
            task = TaskService(db).create_task("/repo", "made while another held the lock")
            assert db.write_gate is not None
            assert db.write_gate.closings == 1
            with _gate_closed(db_path):  # open again: taking it does not fail
                pass
    finally:
        release.set()
        holder.join()
        watcher.join()
    with closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("SELECT prompt FROM tasks WHERE id = ?", (task.task_id,)).fetchone() == (
            "made while another held the lock",
        )


def test_writers_wait_while_the_gate_is_closed_and_go_on_when_it_opens(db_path: Path) -> None:
    done = threading.Event()
    errors: list[BaseException] = []

    with _database(db_path) as db:
        service = TaskService(db)

        def write() -> None:
            try:
                service.create_task("/repo", "after the gate opened")
                done.set()
            except BaseException as exc:
                errors.append(exc)

        with _gate_closed(db_path):
            writer = threading.Thread(target=write)
            writer.start()
            # If the gate were ignored, the write would be done well within this.
            assert not done.wait(timeout=0.5)
            assert _task_count(db_path) == 0
        writer.join(timeout=30)
    assert errors == []
    assert done.is_set()
    assert _task_count(db_path) == 1


def test_a_writer_never_waits_at_the_gate_past_its_busy_timeout(db_path: Path) -> None:
    with _database(db_path, busy_timeout_ms=300) as db, _gate_closed(db_path):
        with pytest.raises(DatabaseUnavailable, match="locked past the busy timeout"):
            TaskService(db).create_task("/repo", "x")
        assert _task_count(db_path) == 0
        # Reads do not wait at the gate.
        assert TaskService(db).list_tasks().tasks == []


def test_a_writer_held_at_the_gate_still_gives_up_at_its_busy_timeout(db_path: Path) -> None:
    """The gate stays closed for most of the busy timeout, and another connection holds SQLite's lock
    throughout: the write fails at its deadline, not up to a budget (STARVING_AFTER_MS) later in
    SQLite's busy handler (150 ms later here, before the fix)."""
    timeout = 1.0
    with (
        _database(db_path, busy_timeout_ms=int(timeout * 1000)) as db,
        _lock_held_for(db_path, 1.3 * timeout),
    ):
        gate = os.open(f"{db_path}-lock", os.O_RDWR)
        fcntl.flock(gate, fcntl.LOCK_EX | fcntl.LOCK_NB)
        opener = threading.Timer(0.95 * timeout, os.close, (gate,))  # opens it 50 ms before the deadline
        started = time.monotonic()
        opener.start()
        try:
            with pytest.raises(DatabaseUnavailable, match="locked past the busy timeout"):
                TaskService(db).create_task("/repo", "x")
            overrun = time.monotonic() - started - timeout
        finally:
            opener.join()
    assert overrun < STARVING_AFTER_MS / 2000
    assert _task_count(db_path) == 0


def test_a_starving_writer_gives_up_at_its_busy_timeout_and_opens_the_gate(db_path: Path) -> None:
    """Something else (a ``sqlite3`` shell left in BEGIN, say) holds the write lock throughout: the
    writer closes the gate, fails at its busy timeout having changed nothing, and the gate opens."""
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        with _database(db_path, busy_timeout_ms=3 * STARVING_AFTER_MS) as db:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(DatabaseUnavailable, match="locked past the busy timeout"):
                TaskService(db).create_task("/repo", "x")
            assert db.write_gate is not None
            assert db.write_gate.closings == 1
            with _gate_closed(db_path):  # open again
                pass
            assert not db.write_gate._closing.locked()  # and this process can close it again
            other.execute("COMMIT")
            TaskService(db).create_task("/repo", "once the lock is free")
    finally:
        other.close()
    assert _task_count(db_path) == 1


def test_a_process_that_dies_with_the_gate_closed_opens_it(db_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(db_path) + '-lock'!r}, os.O_RDWR)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('closed', flush=True)\n"
            "time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "closed"
        with _database(db_path, busy_timeout_ms=300) as db:
            with pytest.raises(DatabaseUnavailable):
                TaskService(db).create_task("/repo", "x")
            holder.kill()
            holder.wait(timeout=30)
            TaskService(db).create_task("/repo", "after the holder died")
    finally:
        holder.kill()
        holder.wait(timeout=30)
        if holder.stdout is not None:
            holder.stdout.close()
    assert _task_count(db_path) == 1


def test_reads_and_sqlalchemy_transactions_keep_the_full_busy_timeout(db_path: Path) -> None:
    """The service's writes run with the short budget; whatever uses the connection next does not."""
    with _database(db_path, busy_timeout_ms=12_345, pool_size=1) as db:
        service = TaskService(db)
        service.create_task("/repo", "x")
        with db.transaction(write=False) as conn:
            assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 12_345
        service.create_task("/repo", "y")
        with db.transaction(write=True) as conn:
            assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == STARVING_AFTER_MS
        # Hand the (shortened) connection back to SQLAlchemy's pool, which holds one: the next
        # SQLAlchemy transactions get that very connection.
        db._idle.pop().fairy.close()
        with db.write() as sa_conn:
            assert sa_conn.execute(text("PRAGMA busy_timeout")).scalar_one() == 12_345
        with db.read() as sa_conn:
            assert sa_conn.execute(text("PRAGMA busy_timeout")).scalar_one() == 12_345


def test_a_busy_timeout_shorter_than_the_budget_means_no_gate(tmp_path: Path) -> None:
    with _database(tmp_path / "t.db", busy_timeout_ms=STARVING_AFTER_MS) as db:
        assert db.write_gate is None


def test_without_flock_windows_there_is_no_gate_and_writes_still_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    with _database(tmp_path / "t.db") as db:
        assert db.write_gate is None
        ensure_schema(db)
        TaskService(db).create_task("/repo", "x")
    assert not (tmp_path / "t.db-lock").exists()


def test_a_file_system_that_refuses_flock_means_no_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(_fd: int, _operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    with _database(tmp_path / "t.db") as db:
        assert db.write_gate is None
        ensure_schema(db)
        TaskService(db).create_task("/repo", "x")


def test_a_lock_file_deleted_while_servers_run_still_gates_them(db_path: Path) -> None:
    """Someone removes tasks.db-lock as stale: a writer kept from the lock past the budget still closes
    the gate (the same file the other servers hold open) and writes, instead of failing."""
    with _database(db_path, busy_timeout_ms=5_000) as first, _database(db_path) as second:
        TaskService(first).list_tasks()
        os.remove(f"{db_path}-lock")
        gate = second.write_gate
        assert gate is not None
        seen_closed: list[bool] = []

        def watch() -> None:  # as the other server's writers see the gate
            for _ in range(40):
                seen_closed.append(not gate.is_open())
                time.sleep(0.01)

        with _lock_held_for(db_path, 3 * STARVING_AFTER_MS / 1000):
            watcher = threading.Thread(target=watch)
            watcher.start()
            TaskService(first).create_task("/repo", "x")
            watcher.join()
        assert first.write_gate is not None
        assert first.write_gate.closings == 1
        assert any(seen_closed), "the other server did not see the gate closed"
    assert _task_count(db_path) == 1


def test_a_gate_that_cannot_be_closed_leaves_the_wait_to_sqlites_busy_handler(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cannot(_self: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    with _database(db_path, busy_timeout_ms=5_000) as db:
        monkeypatch.setattr(type(db.write_gate), "_reopen", cannot)
        with _lock_held_for(db_path, 3 * STARVING_AFTER_MS / 1000):
            TaskService(db).create_task("/repo", "x")
        assert db.write_gate is not None
        assert db.write_gate.closings == 0
    assert _task_count(db_path) == 1
