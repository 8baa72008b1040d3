"""The MCP server: ``build_server(settings)`` returns an ``MCPServer`` whose lifespan owns the database."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from inspect import cleandoc
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from loguru import logger
from mcp.server import MCPServer
from mcp.types import Tool as MCPTool

from task_orchestrator_mcp import __version__
from task_orchestrator_mcp.errors import DatabaseError
from task_orchestrator_mcp.settings import Settings
from task_orchestrator_mcp.stdio import DEFAULT_MAX_LINE_BYTES, max_line_bytes, serve_stdio
from task_orchestrator_mcp.tools import AppState, build_tools

if TYPE_CHECKING:
    # Imported where the database is opened, on a thread: SQLAlchemy is a sixth of a cold start.
    from task_orchestrator_mcp.db.engine import Database
    from task_orchestrator_mcp.service import Clock, TaskService

SERVER_NAME = "task-orchestrator"

INSTRUCTIONS = """\
A shared task queue. Workers loop:
1. acquire_task(work_directory=<your absolute cwd>) -> {"task": null} means nothing to do.
2. Do task.prompt in that directory. On work longer than a few minutes, call heartbeat_task(task_id)
   before lease_expires_at, or the task goes back to the queue for another worker.
3. complete_task(task_id, result) or fail_task(task_id, error). Only the holder may do these.
Planners: create_task, then list_tasks / get_task to follow progress; cancel_task to withdraw."""


class TaskOrchestratorServer(MCPServer[AppState]):
    """MCPServer whose tools/list is compacted: every agent pays for it in context on every session."""

    _compact_tools: list[MCPTool] | None = None
    # The longest request line read (see stdio.StdinLines); build_server sets it from the settings.
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES

    async def list_tools(self) -> list[MCPTool]:
        """The tools with pydantic's generated titles (and output-model prose) left out."""
        if self._compact_tools is None:
            self._compact_tools = [
                tool.model_copy(
                    update={
                        "description": cleandoc(tool.description or ""),
                        # Unknown arguments are refused (see tools._Tool): say so to the model.
                        "input_schema": {
                            **compact_schema(tool.input_schema, keep_descriptions=True),
                            "additionalProperties": False,
                        },
                        "output_schema": None
                        if tool.output_schema is None
                        else compact_schema(tool.output_schema, keep_descriptions=False),
                    }
                )
                for tool in await super().list_tools()
            ]
        return self._compact_tools

    async def run_stdio_async(self) -> None:
        """Serve on stdio as ``MCPServer`` does, through :mod:`stdio`'s reader and writer."""
        await serve_stdio(self._lowlevel_server, self.max_line_bytes)


def compact_schema(schema: dict[str, Any], *, keep_descriptions: bool) -> dict[str, Any]:
    """An equivalent, shorter JSON schema: no ``title`` keys (nor ``description`` unless kept), and
    ``anyOf`` of plain types folded into one ``type`` list (``{"type": ["string", "null"]}``)."""
    drop = {"title"} if keep_descriptions else {"title", "description"}

    def walk(node: Any, in_properties: bool) -> Any:
        if isinstance(node, list):
            return [walk(item, False) for item in node]
        if not isinstance(node, dict):
            return node
        out = {
            key: walk(value, key in ("properties", "$defs") and not in_properties)
            for key, value in node.items()
            # Under "properties"/"$defs" the keys are names, not keywords: keep them all.
            if in_properties or (key not in drop and not (key == "additionalProperties" and value is True))
        }
        if not in_properties and isinstance(out.get("anyOf"), list):
            _fold_any_of(out)
        return out

    result: dict[str, Any] = walk(_inline_refs(schema), False)
    return result


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with every local ``#/$defs/...`` reference replaced by its definition.

    Our models are not recursive, so this always ends; the result is shorter (each definition is
    used once or twice), and a client validating results with ``jsonschema`` no longer resolves a
    reference per field per row (about a third of its time on a 50-row list page).
    """
    defs: dict[str, Any] = schema.get("$defs", {})

    def resolve(node: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [resolve(item, seen) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            name = ref.removeprefix("#/$defs/")
            if name in seen or name not in defs:
                raise ValueError(f"cannot inline {ref!r} (recursive or missing)")
            siblings = {key: value for key, value in node.items() if key != "$ref"}
            return {**resolve(defs[name], (*seen, name)), **resolve(siblings, seen)}
        return {key: resolve(value, seen) for key, value in node.items() if key != "$defs"}

    inlined: dict[str, Any] = resolve(schema, ())
    return inlined


def _fold_any_of(node: dict[str, Any]) -> None:
    members = node["anyOf"]
    if not all(isinstance(m, dict) and set(m) <= {"type", "format", "enum"} and "type" in m for m in members):
        return
    formats = {m["format"] for m in members if "format" in m}
    enums = [m for m in members if "enum" in m]
    if len(formats) > 1 or len(enums) > 1:
        return
    if enums and any(m["type"] != "null" for m in members if "enum" not in m):
        return  # an enum folds only beside null: {"enum": [..., null]}
    del node["anyOf"]
    node["type"] = [m["type"] for m in members]
    if formats:
        node["format"] = formats.pop()
    if enums:
        node["enum"] = [*enums[0]["enum"], None]


def open_database(settings: Settings) -> Database:
    """An engine for the configured URL with the schema at head. Raises DatabaseError when the
    database cannot be used (an OSError when its directory cannot be created)."""
    from task_orchestrator_mcp.db.engine import Database
    from task_orchestrator_mcp.db.migrate import ensure_schema

    database = Database(
        settings.database_url,
        busy_timeout_ms=settings.busy_timeout_ms,
        sqlite_synchronous=settings.sqlite_synchronous,
    )
    try:
        ensure_schema(database)
    except BaseException:
        database.dispose()
        raise
    return database


def task_service(settings: Settings, database: Database, clock: Clock | None = None) -> TaskService:
    """The task service over an open database, configured from ``settings``."""
    from task_orchestrator_mcp.service import TaskService, utc_now

    return TaskService(
        database,
        clock=clock or utc_now,
        worker_id=settings.worker_id,
        max_payload_bytes=settings.max_payload_bytes,
    )


class OpeningDatabase:
    """The database being opened (and migrated) on a thread, and then the task service over it.

    The server answers ``initialize`` and ``tools/list`` meanwhile: importing SQLAlchemy and checking
    the schema is about a sixth of a cold start, and no client needs the database before its first
    tool call. A tool call that comes earlier waits for it.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._on_failure = on_failure
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._closing = False
        self._abandoned = False  # close() stopped waiting: the opening thread closes what it opened
        self._thread: threading.Thread | None = None
        self._database: Database | None = None
        self._service: TaskService | None = None
        self.error: BaseException | None = None
        self.closed = threading.Event()  # set once close() has returned

    def start(self) -> None:
        """Begin opening, on a daemon thread."""
        self._thread = threading.Thread(target=self._open, name="open-database", daemon=True)
        self._thread.start()

    def _open(self) -> None:
        from task_orchestrator_mcp.log import quiet

        try:
            # A failure is reported once, as a whole line, by whoever handles it; not also as a warning.
            with quiet("task_orchestrator_mcp.db.engine", "WARNING"):
                self._database = open_database(self._settings)
            self._service = task_service(self._settings, self._database, self._clock)
        except BaseException as exc:
            self.error = exc
        finally:
            self._done.set()
        with self._lock:
            if self._abandoned and self._database is not None:
                self._database.dispose()
            if self.error is None or self._closing:
                return
            if self._on_failure is not None:
                self._on_failure(self.error)
            else:
                logger.error("cannot use the database: {}", self.error)

    @property
    def ready(self) -> bool:
        """True once the open has finished, either way."""
        return self._done.is_set()

    def service(self) -> TaskService:
        """The task service; waits for the open to finish, and raises if it failed."""
        self._done.wait()
        if self._service is None:
            reason = self.error if isinstance(self.error, DatabaseError) else None
            raise DatabaseError(
                f"The database could not be opened{f': {reason}' if reason else ''}. Check the server's "
                "database URL and log, then restart it.",
                None if reason is None else reason.detail,
            )
        return self._service

    def close(self, wait_seconds: float = 2.0) -> None:
        """Close the database once the open has finished, waiting for it at most ``wait_seconds``.

        An open can wait as long as the busy timeout (another process holding SQLite's lock or the
        migration lock); a client that has left should not wait for it. Past the wait, the opening
        thread closes the database itself when it is done, and a process that exits meanwhile
        takes it along (it is a daemon thread; an unfinished migration is rolled back).
        """
        try:
            self._close(wait_seconds)
        finally:
            self.closed.set()

    def _close(self, wait_seconds: float) -> None:
        with self._lock:
            self._closing = True
        if self._thread is None:  # never started: nothing was opened
            return
        self._thread.join(timeout=wait_seconds)
        with self._lock:
            if not self._done.is_set():
                self._abandoned = True
                logger.debug("not waiting any longer for the database to open")
                return
        if self._database is not None:
            self._database.dispose()


def build_server(
    settings: Settings,
    *,
    database: Database | None = None,
    clock: Clock | None = None,
    opening: OpeningDatabase | None = None,
) -> TaskOrchestratorServer:
    """The task-orchestrator MCP server.

    Given a ``database``, the server uses it and leaves it open. Otherwise its lifespan starts
    ``opening`` (by default a new :class:`OpeningDatabase` for ``settings``), serves while the
    database opens, and closes it at the end.
    """

    @asynccontextmanager
    async def lifespan(_server: MCPServer[AppState]) -> AsyncIterator[AppState]:
        if database is not None:
            yield AppState.of(task_service(settings, database, clock))
            return
        pending = opening or OpeningDatabase(settings, clock=clock)
        pending.start()
        try:
            yield AppState(get_service=pending.service, is_ready=lambda: pending.ready)
        finally:
            with anyio.CancelScope(shield=True):  # close even when the server is being cancelled
                await anyio.to_thread.run_sync(pending.close)

    server = TaskOrchestratorServer(
        SERVER_NAME,
        version=__version__,
        instructions=INSTRUCTIONS,
        lifespan=lifespan,
        tools=build_tools(),
    )
    server.max_line_bytes = max_line_bytes(settings.max_payload_bytes)
    return server
