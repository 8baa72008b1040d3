"""Shared test helpers: a controllable clock, database URLs for both engines, the real server spawned."""

from __future__ import annotations

import fcntl
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from mcp import StdioServerParameters
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

POSTGRES_ENV = "TASK_ORCHESTRATOR_TEST_POSTGRES_URL"
REPO_ROOT = Path(__file__).resolve().parent.parent


class FakeClock:
    """A clock the test moves by hand; starts at a fixed UTC instant."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += timedelta(seconds=seconds)


def postgres_admin_url() -> str | None:
    """The PostgreSQL URL the tests may create databases through, or None when not configured."""
    return os.environ.get(POSTGRES_ENV) or None


@contextmanager
def fresh_postgres_database(admin_url: str) -> Iterator[str]:
    """Create an empty database for one test (or run) and drop it afterwards; yields its URL."""
    name = f"tom_test_{secrets.token_hex(6)}"
    # No pool: a pooled connection would not survive a PostgreSQL restart during the test.
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def server_env(database_url: str, **extra: str) -> dict[str, str]:
    """The environment for a spawned server: explicit, as MCP clients pass it."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        "TASK_ORCHESTRATOR_DATABASE_URL": database_url,
        "TASK_ORCHESTRATOR_LOG_LEVEL": "WARNING",
    }
    env.update(extra)
    return env


@contextmanager
def postgres_read_only(database_url: str) -> Iterator[Callable[[], None]]:
    """Make a PostgreSQL database read-only for every new session, as on a hot standby or a demoted
    primary; the yielded callable makes it writable again (the operator's fix), as does leaving."""
    admin = create_engine(database_url, isolation_level="AUTOCOMMIT")
    name = make_url(database_url).database

    def set_read_only(on: bool) -> None:
        with admin.connect() as conn:
            conn.execute(
                text(f'ALTER DATABASE "{name}" SET default_transaction_read_only = {"on" if on else "off"}')
            )

    try:
        set_read_only(True)
        yield lambda: set_read_only(False)
    finally:
        set_read_only(False)
        admin.dispose()


def server_params(database_url: str, **extra: str) -> StdioServerParameters:
    """Parameters that spawn the real server (``python -m task_orchestrator_mcp``) over stdio."""
    return StdioServerParameters(
        command=sys.executable, args=["-m", "task_orchestrator_mcp"], env=server_env(database_url, **extra)
    )


def run_server_once(
    env: dict[str, str], *args: str, python_flags: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """Run the real server with no client (stdin at EOF) and return how it ended: for start-up checks."""
    return subprocess.run(
        [sys.executable, *python_flags, "-m", "task_orchestrator_mcp", *args],
        env=env,
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def sqlite_integrity_ok(database_url: str) -> None:
    """SQLite's own consistency check (PostgreSQL has none to ask; its tables are checked by use)."""
    if make_url(database_url).get_backend_name() != "sqlite":
        return
    engine = create_engine(database_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA integrity_check")).scalars().all() == ["ok"]
    finally:
        engine.dispose()


def structured(result: Any) -> dict[str, Any]:
    """The structured content of a successful tool call (fails the test on isError)."""
    assert not result.is_error, result.content
    content: dict[str, Any] = result.structured_content
    return content


def error_text(result: Any) -> str:
    """The message of a failed tool call (fails the test if the call succeeded)."""
    assert result.is_error, result.structured_content
    return " ".join(getattr(block, "text", "") for block in result.content)


def wait_for_the_write_gate(database_path: Path, timeout: float = 30.0) -> bool:
    """True once someone has closed SQLite's write gate (an exclusive flock on ``<database>-lock``,
    which a writer kept 200 ms from the lock takes), which a shared flock here cannot get past;
    False after ``timeout`` seconds."""
    fd = os.open(f"{database_path}-lock", os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(fd, fcntl.LOCK_UN)
            time.sleep(0.005)
        return False
    finally:
        os.close(fd)
