"""The service's own connection handling in Database.transaction: reuse, limits, recycling."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from task_orchestrator_mcp.db.engine import Database, _Checkpointer
from task_orchestrator_mcp.db.migrate import ensure_schema
from task_orchestrator_mcp.errors import DatabaseError
from task_orchestrator_mcp.service import TaskService


def test_more_concurrent_transactions_than_the_pool_keeps_all_finish(tmp_path: Path) -> None:
    """Kept connections never starve callers waiting in the pool (with 12 threads and room for 10,
    two wait there; a starved one fails after the 2 s pool timeout), and only pool_size are kept."""
    db = Database(f"sqlite:///{tmp_path / 't.db'}", pool_size=2, busy_timeout_ms=2_000)
    ensure_schema(db)
    errors: list[BaseException] = []
    start = threading.Barrier(12)

    def reader() -> None:
        try:
            start.wait()
            for _ in range(20):
                with db.transaction(write=False) as conn:
                    conn.execute("SELECT count(*) FROM tasks").fetchall()
                    time.sleep(0.002)  # hold it, so the threads overlap
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert db.has_idle_connection
    assert len(db._idle) <= 2
    db.dispose()


def test_a_connection_in_use_at_dispose_is_closed_when_it_is_done(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 't.db'}")
    ensure_schema(db)
    with db.transaction(write=False) as conn:
        db.dispose()
        conn.execute("SELECT 1").fetchall()
    assert not db.has_idle_connection


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql+psycopg://u@h:abc/db", "Not a valid database URL"),
        ("postgresql+psycopg2://u@h/db", "Unsupported database driver"),
        ("sqlite+pysqlcipher:///x.db", "Unsupported database driver"),
    ],
)
def test_urls_the_service_cannot_use_are_refused_in_a_sentence(url: str, says: str) -> None:
    with pytest.raises(DatabaseError, match=says):
        Database(url)


def test_a_bare_postgresql_url_means_psycopg_3() -> None:
    db = Database("postgresql://u@127.0.0.1:1/db")
    assert db.url.drivername == "postgresql+psycopg"
    db.dispose()


def test_sqlite_checkpoints_on_a_background_thread_not_in_a_callers_commit(tmp_path: Path) -> None:
    """Once a burst of writes is over, the background thread copies the WAL into the database file
    (read here with ``immutable=1``, which ignores the WAL), long before the automatic checkpoint's
    threshold; a process that only reads never starts the thread; dispose stops it."""
    path = tmp_path / "t.db"
    db = Database(f"sqlite:///{path}")
    ensure_schema(db)
    checkpointer = db.checkpointer
    assert checkpointer is not None
    reader = Database(f"sqlite:///{path}")
    TaskService(reader).list_tasks()
    assert reader.checkpointer is not None
    assert reader.checkpointer._thread is None
    reader.dispose()

    service = TaskService(db, worker_id="w")
    assert service.acquire_task("/work") is None  # a write transaction that changed nothing
    assert checkpointer._thread is None
    burst = 100
    for i in range(burst):
        service.create_task("/work", f"task {i}")
    # A pause inside the burst may already have let one checkpoint run: wait for the one after it.
    in_file = -1
    deadline = time.monotonic() + 10
    while in_file != burst and time.monotonic() < deadline:
        time.sleep(0.05)
        in_file = _rows_in_main_file(path)
    assert in_file == burst
    assert checkpointer.runs >= 1
    thread = checkpointer._thread
    assert thread is not None
    db.dispose()
    assert not thread.is_alive()


def test_sqlite_checkpoints_wait_while_another_server_writes(tmp_path: Path) -> None:
    """Quiet means the database is quiet, not only this server: while another connection (another
    server's, here a plain one on a thread) commits without pause, the background thread does not
    checkpoint, however long this server has been idle since its own write; once those writes stop,
    it does."""
    path = tmp_path / "t.db"
    db = Database(f"sqlite:///{path}")
    ensure_schema(db)
    checkpointer = db.checkpointer
    assert checkpointer is not None
    service = TaskService(db, worker_id="w")
    service.create_task("/work", "first")
    # Let the checkpoint of that commit run, so the count below starts from a quiet database.
    _runs_once_past(checkpointer, 0)
    stop = threading.Event()
    commits = 0

    def other_server() -> None:
        nonlocal commits
        conn = sqlite3.connect(path, isolation_level=None, timeout=10)
        conn.execute("PRAGMA synchronous = OFF")  # commits quickly, one after another
        try:
            while not stop.is_set():
                conn.execute("UPDATE tasks SET prompt = ?", (f"edit {commits}",))
                commits += 1
        finally:
            conn.close()

    writer = threading.Thread(target=other_server)
    writer.start()
    try:
        while commits == 0 and writer.is_alive():
            time.sleep(0.001)
        runs_before = checkpointer.runs
        service.create_task("/work", "second")  # wakes the thread while the other server writes
        time.sleep(0.6)  # 12 quiet periods of this server
        runs_while_busy = checkpointer.runs
    finally:
        stop.set()
        writer.join()
    assert commits > 100
    assert runs_while_busy == runs_before
    assert _runs_once_past(checkpointer, runs_before) > runs_before
    db.dispose()


def _runs_once_past(checkpointer: _Checkpointer, runs: int) -> int:
    """The checkpointer's count of runs once it is past ``runs``, or as it is after 10 s."""
    deadline = time.monotonic() + 10
    while checkpointer.runs <= runs and time.monotonic() < deadline:
        time.sleep(0.02)
    return checkpointer.runs


def _rows_in_main_file(path: Path) -> int:
    """Tasks in the database file itself, the WAL ignored (-1 while a checkpoint is mid-copy)."""
    main_file = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        count: int = main_file.execute("SELECT count(*) FROM tasks").fetchone()[0]
    except sqlite3.DatabaseError:
        return -1
    finally:
        main_file.close()
    return count


def test_a_sqlite_path_under_home_opens_there_with_its_gate_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sqlite:///~/...`` is the file under the home folder (its folder made), not a folder named
    ``~``; the write gate's lock file sits beside that same file."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    db = Database("sqlite:///~/queue/tasks.db")
    try:
        ensure_schema(db)
        TaskService(db, worker_id="w").create_task("/work", "one")
    finally:
        db.dispose()
    assert (tmp_path / "home" / "queue" / "tasks.db").is_file()
    assert (tmp_path / "home" / "queue" / "tasks.db-lock").exists()
    assert not (tmp_path / "~").exists()


def test_a_connection_given_back_across_a_recycle_is_not_used_again(tmp_path: Path) -> None:
    """A thread gives its connection back just as another recycles the pool (the generation moves on
    after the first passed its check): the next transaction opens a fresh connection instead."""
    db = Database(f"sqlite:///{tmp_path / 't.db'}")
    ensure_schema(db)
    with db.transaction(write=False) as before:
        pass
    assert db.has_idle_connection
    db._generation += 1  # what _recycle does, after that thread's check and before its append
    with db.transaction(write=False) as after:
        after.execute("SELECT 1").fetchall()
    assert after is not before
    db.dispose()


@pytest.mark.parametrize("engine_name", [pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_postgresql_urls_own_options_are_kept_beside_the_servers(database_url: str) -> None:
    """?options=-csearch_path=... and ?application_name=... in the URL reach the session (they were
    replaced by the server's own connect arguments: the schema went to public); the server's
    statement timeout still applies."""
    setup = Database(database_url)
    with setup.write() as conn:
        conn.execute(text("CREATE SCHEMA queue"))
    setup.dispose()
    db = Database(f"{database_url}?options=-csearch_path%3Dqueue&application_name=planner")
    try:
        ensure_schema(db)
        TaskService(db).create_task("/repo", "x")
        with db.read() as conn:
            assert conn.execute(text("SHOW search_path")).scalar_one() == "queue"
            assert conn.execute(text("SHOW application_name")).scalar_one() == "planner"
            assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "30s"
            schemas = conn.execute(
                text("SELECT table_schema FROM information_schema.tables WHERE table_name = 'tasks'")
            ).scalars()
            assert list(schemas) == ["queue"]
    finally:
        db.dispose()


@pytest.mark.parametrize("engine_name", [pytest.param("postgres", marks=pytest.mark.postgres)])
def test_writes_run_read_committed_whatever_the_databases_default(database_url: str) -> None:
    """A database whose default isolation is SERIALIZABLE: four services claiming and completing
    from one directory at once get no "unavailable" (writes had the database's default, so a claim
    meeting a row another had just changed failed to serialize; READ COMMITTED re-checks the row)."""
    setup = Database(database_url)
    with setup.write() as conn:
        name = conn.execute(text("SELECT current_database()")).scalar_one()
        conn.execute(text(f'ALTER DATABASE "{name}" SET default_transaction_isolation = serializable'))
    ensure_schema(setup)
    for n in range(120):
        TaskService(setup).create_task("/repo", f"t{n}")
    setup.dispose()
    databases = [Database(database_url) for _ in range(4)]
    errors: list[BaseException] = []
    done: list[str] = []

    def work(db: Database) -> None:
        service = TaskService(db)
        try:
            while (task := service.acquire_task("/repo")) is not None:
                done.append(service.complete_task(task.task_id, "ok").task_id)
        except BaseException as exc:  # collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(db,)) for db in databases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for db in databases:
        db.dispose()
    assert errors == []
    assert len(done) == len(set(done)) == 120
