"""Logging set-up: loguru to stderr (or a file), never stdout, with stdlib logging routed into it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from loguru import logger

if TYPE_CHECKING:
    from loguru import Record

_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {process} | {name}:{line} - {message}"
# Extra filters consulted by the sink (see quiet()); a record is written only if all keep it.
_filters: list[Callable[[Record], bool]] = []
# The log file, when logging goes to one (open for the life of the process, or until reconfigured).
_log_files: list[TextIO] = []


class _InterceptHandler(logging.Handler):
    """Send stdlib records (SQLAlchemy, alembic, mcp) to loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def _keep(record: Record) -> bool:
    return all(f(record) for f in _filters)


def configure_logging(level: str, log_file: Path | None = None) -> None:
    """Route all logging to stderr, or to ``log_file`` when given; stdout stays the protocol's.
    Raises OSError when the log file cannot be opened."""
    logger.remove()
    while _log_files:
        _log_files.pop().close()
    sink: TextIO = sys.stderr
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        # Opened here, not by loguru, which reads a path as a template: "{time}" in a file name would be
        # filled in, and a lone brace would fail. Appended to line by line (servers may share a file).
        sink = open(log_file, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (kept open)
        _log_files.append(sink)
    logger.add(
        sink, level=level, format=_FORMAT, filter=_keep, backtrace=False, diagnose=False, colorize=False
    )
    stdlib_level = {"TRACE": "DEBUG", "SUCCESS": "INFO"}.get(level, level)
    logging.basicConfig(handlers=[_InterceptHandler()], level=stdlib_level, force=True)
    # Alembic announces each of its plugins at INFO on every migration: noise for our users.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


@contextmanager
def quiet(module: str, level: str) -> Iterator[None]:
    """Drop ``module``'s log records at ``level`` and below while the block runs."""
    threshold = logger.level(level).no

    def keep(record: Record) -> bool:
        return record["level"].no > threshold or record["name"] != module

    _filters.append(keep)
    try:
        yield
    finally:
        _filters.remove(keep)
