"""Shared pieces: results, statistics, the machine description and fast data loading."""

from __future__ import annotations

import os
import platform
import shutil
import sqlite3
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from task_orchestrator_mcp.db.engine import Database
from task_orchestrator_mcp.db.migrate import ensure_schema

# How SQLAlchemy's SQLite DateTime stores a (naive UTC) value; the raw loaders write the same text.
SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"


@dataclass
class Result:
    """One line of the table: a measured value, its floor and the goal on the ratio."""

    part: str
    name: str
    unit: str
    value: float
    floor: float | None = None
    goal: str = ""
    ok: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """value / floor, when there is a floor."""
        if self.floor is None or self.floor == 0:
            return None
        return self.value / self.floor

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with the ratio."""
        data = asdict(self)
        data["ratio"] = self.ratio
        return data


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank on the sorted values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[rank]


def machine() -> dict[str, Any]:
    """Cores, CPU model, Python and SQLite versions: the context every figure needs."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
    }


class Workspace:
    """A directory of databases; ``migrated_copy`` hands out a fresh file at head in milliseconds."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._template = root / "template.db"
        self._count = 0

    def migrated_copy(self, name: str) -> Path:
        """A new SQLite file already at the head revision."""
        if not self._template.exists():
            database = Database(f"sqlite:///{self._template}")
            try:
                ensure_schema(database)
            finally:
                database.dispose()
        self._count += 1
        path = self.root / f"{self._count:03d}-{name}.db"
        shutil.copyfile(self._template, path)
        return path


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of an SQLite file."""
    return f"sqlite:///{path}"


def task_rows(
    count: int, directory: str, *, status: str = "pending", start: datetime | None = None, prefix: str = "b"
) -> list[dict[str, Any]]:
    """``tasks`` rows for SQLAlchemy Core inserts (any engine): medium priority, one per millisecond."""
    base = start or datetime(2026, 1, 1, tzinfo=UTC)
    rows = []
    for i in range(count):
        at = base + timedelta(milliseconds=i)
        rows.append(
            {
                "id": f"{prefix}{i:011d}",
                "work_directory": directory,
                "prompt": f"benchmark task {i}",
                "priority": 1,
                "tags": [],
                "status": status,
                "worker_id": None,
                "attempts": 0,
                "max_attempts": 3,
                "result": None,
                "error": None,
                "created_at": at,
                "updated_at": at,
                "started_at": None,
                "completed_at": None,
                "lease_expires_at": None,
                "lease_seconds": None,
            }
        )
    return rows


def load_tasks(url: str, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` into ``tasks`` in one transaction (SQLAlchemy Core, so any engine)."""
    from sqlalchemy import insert

    from task_orchestrator_mcp.db.tables import tasks

    database = Database(url)
    try:
        with database.write() as conn:
            for start in range(0, len(rows), 5000):
                conn.execute(insert(tasks), rows[start : start + 5000])
    finally:
        database.dispose()
