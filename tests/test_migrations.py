"""Alembic owns the schema: the code's head matches the scripts, and the tables match the migrations."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from task_orchestrator_mcp.db.engine import Database
from task_orchestrator_mcp.db.migrate import HEAD_REVISION, ensure_schema, script_location
from task_orchestrator_mcp.db.tables import metadata
from tests.support import REPO_ROOT, run_server_once, server_env


def test_head_revision_constant_matches_alembic() -> None:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    assert ScriptDirectory.from_config(config).get_heads() == [HEAD_REVISION]


def _alembic(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TASK_ORCHESTRATOR_DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_alembic_cli_upgrade_check_downgrade(database_url: str) -> None:
    up = _alembic("upgrade", "head", url=database_url)
    assert up.returncode == 0, up.stderr
    assert up.stdout == ""
    check = _alembic("check", url=database_url)
    assert check.returncode == 0, check.stderr + check.stdout
    assert "No new upgrade operations detected" in check.stdout + check.stderr
    engine = create_engine(database_url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert set(metadata.tables) <= tables
        down = _alembic("downgrade", "base", url=database_url)
        assert down.returncode == 0, down.stderr
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
    again = _alembic("upgrade", "head", url=database_url)
    assert again.returncode == 0, again.stderr


def test_a_schema_from_a_newer_release_stops_start_up_with_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'future.db'}"
    database = Database(url)
    try:
        ensure_schema(database)
        with database.write() as conn:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        database.dispose()
    proc = run_server_once(server_env(url))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "revision '9999'" in proc.stderr
    assert "upgrade task-orchestrator-mcp" in proc.stderr
