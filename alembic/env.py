"""Alembic environment: the server passes its own connection in; the CLI uses the environment's URL."""

from __future__ import annotations

from logging.config import fileConfig

from sqlalchemy import Connection

from alembic import context
from task_orchestrator_mcp.db.tables import metadata

config = context.config


def _configure_and_run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run() -> None:
    """Run migrations on the server's connection, or on a fresh one to the configured URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    from task_orchestrator_mcp.db.engine import Database
    from task_orchestrator_mcp.settings import Settings

    database = Database(config.get_main_option("sqlalchemy.url") or Settings().database_url)
    try:
        with database.write() as conn:
            _configure_and_run(conn)
    finally:
        database.dispose()


if context.is_offline_mode():
    raise SystemExit("Offline (--sql) mode is not supported; run against a database.")
run()
