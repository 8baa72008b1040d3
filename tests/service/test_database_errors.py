"""Driver errors become domain errors whose advice fits: retry only what a retry can fix."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

import pytest

from task_orchestrator_mcp.db.engine import Database
from task_orchestrator_mcp.db.repository import TaskRepository
from task_orchestrator_mcp.errors import DatabaseError, DatabaseUnavailable


@pytest.mark.parametrize("engine_name", [pytest.param("postgres", marks=pytest.mark.postgres)])
def test_permanent_postgres_error_is_not_called_unavailable(database: Database) -> None:
    # Bypass the service's own limit to reach PostgreSQL's: an index entry over ~2.7 kB (SQLSTATE 54000).
    now = datetime.now(UTC)
    huge_directory = "/" + secrets.token_hex(4000)
    with pytest.raises(DatabaseError) as caught, database.transaction(write=True) as conn:
        TaskRepository(conn).insert_task(
            {
                "id": "t1", "work_directory": huge_directory, "prompt": "p", "priority": 1, "tags": [],
                "status": "pending", "worker_id": None, "attempts": 0, "max_attempts": 3, "result": None,
                "error": None, "created_at": now, "updated_at": now, "started_at": None,
                "completed_at": None, "lease_expires_at": None, "lease_seconds": None,
            }
        )  # fmt: skip
    assert not isinstance(caught.value, DatabaseUnavailable)
    assert "rejected the request" in str(caught.value)
    assert caught.value.detail is not None
    assert "index row" in caught.value.detail


@pytest.mark.parametrize("engine_name", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_table_that_is_missing_is_not_called_unavailable(database: Database) -> None:
    """A schema that is not what the server expects (here: a table dropped under it) cannot be fixed
    by retrying: both engines say "rejected" (SQLite said "unavailable, retry": its generic error
    comes as an OperationalError)."""
    with database.write() as conn:
        conn.exec_driver_sql("DROP TABLE task_history")
    with pytest.raises(DatabaseError) as caught, database.transaction(write=False) as conn:
        TaskRepository(conn).history("t1")
    assert not isinstance(caught.value, DatabaseUnavailable)
    assert "rejected the request" in str(caught.value)
