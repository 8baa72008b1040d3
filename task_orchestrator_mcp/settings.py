"""Configuration: ``TASK_ORCHESTRATOR_*`` environment variables (each also a CLI flag), validated once."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, unquote

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"]
MIB = 1024 * 1024


def default_database_url() -> str:
    """The embedded default: ``tasks.db`` in the user's data directory (created on first use)."""
    from platformdirs import user_data_path

    return f"sqlite:///{user_data_path('task-orchestrator-mcp', appauthor=False) / 'tasks.db'}"


# dialect[+driver]://rest, as SQLAlchemy's make_url reads it.
_URL = re.compile(r"^(?P<backend>\w+?)(?:\+\w+)?://(?P<rest>.*)$", re.DOTALL)


def _check_sqlite_file(rest: str) -> None:
    """Refuse an SQLite URL that does not name one plain file every server process can share. The
    path and query are decoded as SQLAlchemy decodes them (``%66ile:`` is ``file:``)."""
    raw_path, _, query = rest.partition("?")
    path = unquote(raw_path).removeprefix("/")
    if path in ("", ":memory:"):
        raise ValueError("an in-memory SQLite database cannot be shared; give a file path")
    # A URI file name (file:..., or uri=true) can name a private in-memory database
    # (file::memory:, mode=memory: each connection got its own, and acknowledged writes were lost)
    # or turn off what the queue relies on (nolock=1, immutable=1). A plain path is all it needs.
    # uri=false (or off, no, 0...) is SQLAlchemy's default, and harmless.
    uri = any(
        key.lower() == "uri" and value.strip().lower() not in _FALSE
        for key, value in parse_qsl(query, keep_blank_values=True)
    )
    if path.startswith("file:") or uri:
        raise ValueError(
            "SQLite URI file names (file:..., uri=true) are not supported; "
            "give a plain file path, e.g. sqlite:////home/me/tasks.db"
        )


# What SQLAlchemy reads as false in a URL's query (its asbool).
_FALSE = frozenset({"false", "no", "off", "n", "f", "0"})


class Settings(BaseSettings):
    """Everything the server can be told. An invalid value stops it at start; a database that cannot
    be used (the URL is parsed fully only then) stops it right after the handshake."""

    model_config = SettingsConfigDict(env_prefix="TASK_ORCHESTRATOR_", extra="ignore", frozen=True)

    database_url: str = Field(
        default_factory=default_database_url,
        description="SQLAlchemy URL: sqlite:///path/tasks.db or postgresql+psycopg://user@host/db",
    )
    log_level: LogLevel = "INFO"
    log_file: Path | None = None
    sqlite_synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = Field(
        default="FULL", description="FULL: an acknowledged write survives power loss."
    )
    busy_timeout_ms: int = Field(default=30_000, ge=0, le=600_000)
    max_payload_bytes: int = Field(default=MIB, ge=1024, le=256 * MIB)
    worker_id: str | None = Field(default=None, description="This server's default worker id.")

    @field_validator("worker_id", "log_file", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # Client configurations write "" to mean "not set": the default, as if it were not there.
        return None if value == "" else value

    @field_validator("worker_id")
    @classmethod
    def _check_worker_id(cls, value: str | None) -> str | None:
        # The rules an agent's own worker_id meets in the service (256 characters, as its column).
        if value is None:
            return None
        if not value.strip() or len(value) > 256 or "\x00" in value:
            raise ValueError("must be 1 to 256 characters, not only spaces, without NUL")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # an environment value that is not UTF-8 has lone surrogates
            raise ValueError("must be valid UTF-8 text") from None
        return value

    @field_validator("log_level", "sqlite_synchronous", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        # The shape of SQLAlchemy's URLs, checked without importing SQLAlchemy (a sixth of a cold
        # start): the server answers the client while the database opens. The full parse comes then.
        match = _URL.match(value)
        if match is None:
            raise ValueError(
                "not a database URL; use sqlite:///path/to/tasks.db or postgresql+psycopg://user@host/db"
            )
        backend = match["backend"]
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {backend!r}; use sqlite or postgresql")
        if backend == "sqlite":
            _check_sqlite_file(match["rest"])
        return value

    @property
    def is_sqlite(self) -> bool:
        """True when the database is an SQLite file."""
        return self.database_url.startswith("sqlite")
