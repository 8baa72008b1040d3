"""Command line: arguments and environment -> Settings, logging, then serve MCP over stdio.

Nothing but the protocol may reach stdout once serving, so every message here goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from task_orchestrator_mcp import __version__

if TYPE_CHECKING:
    from mcp.server import MCPServer

    from task_orchestrator_mcp.server import OpeningDatabase
    from task_orchestrator_mcp.settings import Settings

PROG = "task-orchestrator-mcp"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A durable task queue for AI agents, served over MCP on stdio. "
        "Every setting can also be given as a TASK_ORCHESTRATOR_* environment variable.",
    )
    parser.add_argument(
        "--database-url",
        help="SQLAlchemy URL (env TASK_ORCHESTRATOR_DATABASE_URL); "
        "default: tasks.db in your user data directory",
    )
    parser.add_argument(
        "--log-level",
        help="TRACE, DEBUG, INFO (default), SUCCESS, WARNING, ERROR, CRITICAL "
        "(env TASK_ORCHESTRATOR_LOG_LEVEL)",
    )
    parser.add_argument("--log-file", help="log here instead of stderr (env TASK_ORCHESTRATOR_LOG_FILE)")
    parser.add_argument(
        "--check",
        action="store_true",
        help="open the database (creating or upgrading its schema), say where it is, and exit: "
        "0 if it can be used, 1 if not",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    return parser


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until the client closes stdin (or, with ``--check``, only open the database). Exit 2 on bad
    settings, 1 when the database can't be used."""
    args = _parser().parse_args(argv)
    from pydantic import ValidationError

    from task_orchestrator_mcp.settings import Settings

    overrides = {
        key: value
        for key, value in (
            ("database_url", args.database_url),
            ("log_level", args.log_level),
            ("log_file", args.log_file),
        )
        if value is not None
    }
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "settings"
        message = first["msg"].removeprefix("Value error, ")
        return _fail(f"invalid setting TASK_ORCHESTRATOR_{field.upper()}: {message}", 2)

    from task_orchestrator_mcp.log import configure_logging

    try:
        configure_logging(settings.log_level, settings.log_file)
    except OSError as exc:
        return _fail(f"cannot open the log file {settings.log_file}: {exc.strerror}", 2)

    def failed(exc: BaseException) -> int:
        return _fail(_database_failure(settings.database_url, exc), 1)

    if args.check:
        return _check(settings, failed)
    return _serve_stdio(settings, failed)


def _serve_stdio(settings: Settings, failed: Callable[[BaseException], int]) -> int:
    """Serve until stdin ends or a signal comes; the exit code."""
    import anyio
    from loguru import logger

    from task_orchestrator_mcp.server import OpeningDatabase, build_server

    def fail_now(exc: BaseException) -> None:
        # The database failed to open while serving: one line, and the process ends at once, as it
        # would have before serving. Nothing was written anywhere.
        try:
            failed(exc)
        finally:
            os._exit(1)

    for fd, says in (
        (0, "stdin is closed; an MCP client sends its requests there"),  # started with <&-
        (1, "stdout is closed; an MCP client reads the server's answers there"),  # >&-
    ):
        try:
            os.fstat(fd)
        except OSError:
            return _fail(says, 2)
    opening = OpeningDatabase(settings, on_failure=fail_now)
    logger.info("serving MCP on stdio")
    try:
        try:
            anyio.run(_serve, build_server(settings, opening=opening), opening)
        except* (BrokenPipeError, ConnectionResetError):
            # The client left while an answer was on its way to it: nothing to serve any more, and
            # nothing acknowledged is lost (an answer it never read acknowledged nothing). Point
            # stdout at /dev/null, or the interpreter's own flush at exit reports the broken pipe again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            logger.info("the client closed the connection")
    except KeyboardInterrupt:  # Ctrl-C before our signal handler was in place: nothing was served yet
        return 128 + signal.SIGINT
    if opening.error is not None:  # the client left before the open failed
        return failed(opening.error)
    return 0


# After SIGINT or SIGTERM: new tool calls are refused, those running get FINISH_CALLS_SECONDS to finish
# and be answered, then serving is cancelled (a write on its thread still ends first) and the database
# is closed. Past STOP_GRACE_SECONDS in all, the process exits anyway: a write still waiting then (out
# the busy timeout) is abandoned unanswered and rolled back. A cancelled call is not answered either,
# so nothing was acknowledged; as when a client is killed, a claim made then comes back to the queue
# when its lease ends.
FINISH_CALLS_SECONDS = 2.0
STOP_GRACE_SECONDS = 3.0


async def _serve(server: MCPServer[Any], opening: OpeningDatabase) -> None:
    """Serve on stdio until the client closes stdin, or until Ctrl-C (SIGINT) or SIGTERM.

    On a signal, the calls running finish and are answered (new ones are refused), serving is
    cancelled and the lifespan closes the database; the process then exits with 128 + the signal's
    number. It exits itself: where stdin is read on a worker thread (a file given as stdin; see
    ``stdio``), that read cannot be cancelled, and a write to a client that stopped reading cannot
    either. A second signal ends the process at once."""
    import anyio
    from anyio.abc import TaskStatus
    from loguru import logger

    from task_orchestrator_mcp.stdio import CALLS

    serving = anyio.CancelScope()

    async def stop_on_signal(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        # Outside the serving scope, so that it still listens while serving unwinds.
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if CALLS.stopping:
                    logger.warning("{} received again: exiting now", name)
                    sys.stderr.flush()
                    os._exit(128 + signum)
                logger.info("{} received: stopping", name)
                CALLS.stopping = True  # new calls are refused; those running finish and are answered
                _exit_once_closed(opening, 128 + signum)
                tg.start_soon(finish_calls_then_stop)

    async def finish_calls_then_stop() -> None:
        with anyio.move_on_after(FINISH_CALLS_SECONDS) as waiting:
            await CALLS.until_idle()
        if waiting.cancelled_caught:
            logger.warning("calls still running after {} s are cancelled", FINISH_CALLS_SECONDS)
        serving.cancel()

    async with anyio.create_task_group() as tg:
        # Listening before serving starts: a signal that came earlier would meet the event loop's own
        # handler, which cancels too, but leaves the process waiting on stdin.
        await tg.start(stop_on_signal)
        with serving:
            await server.run_stdio_async()
        tg.cancel_scope.cancel()


def _exit_once_closed(opening: OpeningDatabase, code: int) -> None:
    """End the process with ``code`` when ``opening`` has closed the database, or after
    STOP_GRACE_SECONDS, whichever comes first (from a daemon thread: the event loop may be stuck)."""
    from loguru import logger

    def wait_then_exit() -> None:
        if opening.closed.wait(STOP_GRACE_SECONDS):
            logger.info("stopped")
        else:
            logger.warning("stopping took longer than {} s: exiting now", STOP_GRACE_SECONDS)
        sys.stderr.flush()
        os._exit(code)

    threading.Thread(target=wait_then_exit, name="exit-once-closed", daemon=True).start()


def _check(settings: Settings, failed: Callable[[BaseException], int]) -> int:
    """``--check``: open the database as serving would (waiting for it as long as the busy timeout),
    then one line on stderr: where it is, or why it cannot be used."""
    from sqlalchemy import text

    from task_orchestrator_mcp.db.engine import describe
    from task_orchestrator_mcp.db.migrate import HEAD_REVISION
    from task_orchestrator_mcp.log import quiet
    from task_orchestrator_mcp.server import open_database

    try:
        # The result is the one line below: no warning before a failure, no migration's progress.
        with (
            quiet("task_orchestrator_mcp.db.engine", "WARNING"),
            quiet("task_orchestrator_mcp.db.migrate", "WARNING"),
            quiet("alembic.runtime.migration", "WARNING"),
        ):
            database = open_database(settings)
            try:
                # A database at head is only read when opened: write once, so that a read-only one
                # (file, folder, role) fails here and not on the first task.
                with database.write() as conn:
                    conn.execute(text("UPDATE alembic_version SET version_num = version_num"))
            finally:
                database.dispose()
    except Exception as exc:
        return failed(exc)
    return _fail(f"the database {describe(settings.database_url)} is ready (schema {HEAD_REVISION})", 0)


def _database_failure(url: str, exc: BaseException) -> str:
    from task_orchestrator_mcp.db.engine import describe
    from task_orchestrator_mcp.errors import DatabaseError, TaskOrchestratorError

    try:
        where = describe(url)
    except Exception:  # an unparseable URL is what is being reported
        where = "(unparseable URL)"
    if isinstance(exc, DatabaseError):
        detail = f" ({exc.detail})" if exc.detail else ""
        return f"cannot use the database {where}: {exc}{detail}"
    if isinstance(exc, TaskOrchestratorError | OSError):
        return f"cannot use the database {where}: {exc}"
    return f"cannot use the database {where}: unexpected {type(exc).__name__}: {exc}"


if __name__ == "__main__":
    sys.exit(main())
