"""Helpers shared by the proofs: hypothesis profiles (default vs soak), fresh databases, table snapshots."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loguru import logger
from sqlalchemy import Engine, text

from task_orchestrator_mcp.db.engine import Database
from task_orchestrator_mcp.db.migrate import ensure_schema

SOAK_ENV = "TASK_ORCHESTRATOR_SOAK"
# Every table the project owns, in an order a DELETE can follow (children first).
TABLES = ("task_history", "task_tags", "tasks", "alembic_version")


def incompressible(n: int) -> str:
    """``n`` CJK characters in a scrambled order: text PostgreSQL cannot compress into an index entry."""
    return "".join(chr(0x4E00 + (i * 7919) % 20_000) for i in range(n))


def soak() -> bool:
    """True when the long soak mode is asked for (``TASK_ORCHESTRATOR_SOAK=1``)."""
    return os.environ.get(SOAK_ENV, "") not in ("", "0", "false", "no")


@contextmanager
def quiet_logs() -> Iterator[None]:
    """Silence the package's loguru output: thousands of debug lines would dominate the run time."""
    logger.disable("task_orchestrator_mcp")
    try:
        yield
    finally:
        logger.enable("task_orchestrator_mcp")


class SqliteTemplate:
    """A migrated SQLite file, copied for each example: a fresh database without paying Alembic each time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.template = folder / "template.db"
        db = Database(f"sqlite:///{self.template}")
        try:
            ensure_schema(db)
        finally:
            # Closing the last connection checkpoints the WAL into the main file, so one file is a copy.
            db.dispose()
        self._count = 0

    def fresh_url(self) -> str:
        """The URL of a new copy of the template."""
        self._count += 1
        path = self.folder / f"example-{self._count}.db"
        shutil.copyfile(self.template, path)
        return f"sqlite:///{path}"


def clear_tables(database: Database) -> None:
    """Delete every task row (keeps the schema and its version): an empty queue on a reused database."""
    with database.write() as conn:
        for table in TABLES[:-1]:
            conn.execute(text(f"DELETE FROM {table}"))  # noqa: S608 - fixed names


def snapshot(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every project table, in a stable order: equal snapshots mean an unchanged database."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    with engine.connect() as conn:
        for table in TABLES:
            rows = conn.execute(text(f"SELECT * FROM {table}")).all()  # noqa: S608 - fixed names
            out[table] = sorted((tuple(row) for row in rows), key=repr)
    return out
