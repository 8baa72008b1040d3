"""Fixtures: every database-backed test runs on SQLite and, when configured, on PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from task_orchestrator_mcp.db.engine import Database
from task_orchestrator_mcp.db.migrate import ensure_schema
from task_orchestrator_mcp.service import TaskService
from tests.support import FakeClock, fresh_postgres_database, postgres_admin_url

ENGINES = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


@pytest.fixture
def anyio_backend() -> str:
    """anyio's pytest plugin: run async tests on asyncio only."""
    return "asyncio"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip PostgreSQL tests, with the reason, when no test server is configured (CI forbids that)."""
    if postgres_admin_url():
        return
    if os.environ.get("TASK_ORCHESTRATOR_REQUIRE_POSTGRES"):
        raise pytest.UsageError(
            "TASK_ORCHESTRATOR_REQUIRE_POSTGRES is set, TASK_ORCHESTRATOR_TEST_POSTGRES_URL is not"
        )
    skip = pytest.mark.skip(
        reason="TASK_ORCHESTRATOR_TEST_POSTGRES_URL is not set (no PostgreSQL to test on)"
    )
    for item in items:
        if "postgres" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=ENGINES)
def engine_name(request: pytest.FixtureRequest) -> str:
    """Which engine this test runs on: "sqlite" or "postgres"."""
    name: str = request.param
    return name


@pytest.fixture
def database_url(engine_name: str, tmp_path: Path) -> Iterator[str]:
    """An empty database of the test's engine: a new SQLite file, or a new PostgreSQL database."""
    if engine_name == "sqlite":
        yield f"sqlite:///{tmp_path / 'tasks.db'}"
        return
    admin = postgres_admin_url()
    assert admin is not None
    with fresh_postgres_database(admin) as url:
        yield url


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    """An open database at the head revision."""
    db = Database(database_url)
    ensure_schema(db)
    try:
        yield db
    finally:
        db.dispose()


@pytest.fixture
def clock() -> FakeClock:
    """A hand-driven clock."""
    return FakeClock()


@pytest.fixture
def service(database: Database, clock: FakeClock) -> TaskService:
    """The task service on a real database, with a fake clock and a fixed default worker id."""
    return TaskService(database, clock=clock, worker_id="worker-default", max_payload_bytes=64 * 1024)
