"""The MCP tools: thin handlers that validate through the service and turn domain errors into ToolError.

Descriptions are read by a model on every call: short, exact, with the contract only.
Each handler builds its own CallToolResult from the model the service returns (``_result``): the
structured content the SDK would have produced, and its text copy as compact JSON.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import anyio.to_thread
from loguru import logger
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.server.mcpserver.utilities.func_metadata import FuncMetadata
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, BeforeValidator, Field, PrivateAttr, ValidationError
from pydantic_core import to_json

from task_orchestrator_mcp.errors import TaskOrchestratorError
from task_orchestrator_mcp.models import (
    AcquireResult,
    PriorityName,
    StatusName,
    Task,
    TaskPage,
    TaskWithHistory,
)
from task_orchestrator_mcp.stdio import CALLS

if TYPE_CHECKING:
    from task_orchestrator_mcp.service import TaskService


@dataclass(frozen=True, slots=True)
class AppState:
    """What every tool call can reach (the server's lifespan context): the task service, whose
    database may still be opening when the first calls arrive."""

    get_service: Callable[[], TaskService]  # waits until the database is open; raises if it failed
    is_ready: Callable[[], bool]  # True once get_service() would not wait

    @classmethod
    def of(cls, service: TaskService) -> AppState:
        """A state whose service is ready."""
        return cls(get_service=lambda: service, is_ready=lambda: True)


READ = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)


def _write(*, idempotent: bool = False, destructive: bool = False) -> ToolAnnotations:
    return ToolAnnotations(
        read_only_hint=False, destructive_hint=destructive, idempotent_hint=idempotent, open_world_hint=False
    )


def _not_a_boolean(value: object) -> object:
    # pydantic's lax mode reads true as 1: acquire_task(lease_seconds=true) would grant a 1 s lease.
    # The service refuses booleans too, but never sees one once pydantic has converted it.
    if isinstance(value, bool):
        raise ValueError("must be a whole number, not true or false")
    return value


Count = BeforeValidator(_not_a_boolean)
WorkDir = Annotated[str, Field(description="Absolute path, e.g. /home/me/repo.")]
WorkerId = Annotated[str | None, Field(description="Defaults to this server's own worker id.")]


@contextmanager
def _tool_errors(tool: str) -> Iterator[None]:
    """Domain errors reach the agent as their sentence; anything else as a generic line (and a log)."""
    try:
        yield
    except TaskOrchestratorError as exc:
        raise ToolError(str(exc)) from exc
    except Exception as exc:
        logger.exception("unexpected error in {}", tool)
        raise ToolError("Internal error in task-orchestrator; the server's log has the details.") from exc


def _service(ctx: Context[AppState]) -> TaskService:
    return ctx.request_context.lifespan_context.get_service()


async def _read(
    ctx: Context[AppState], tool: str, read: Callable[[TaskService], BaseModel]
) -> CallToolResult:
    """Run a read tool: inline on the event loop where a read never waits (SQLite), which saves the
    hand-off to a worker thread, a large part of a no-op call; on a worker thread otherwise."""
    state = ctx.request_context.lifespan_context
    with _tool_errors(tool):
        # Never wait on the event loop: a call that beats the database's opening waits on a thread.
        service = (
            state.get_service() if state.is_ready() else await anyio.to_thread.run_sync(state.get_service)
        )
        if service.reads_never_wait:
            return _result(read(service))
        return await anyio.to_thread.run_sync(lambda: _result(read(service)))


# What a tool returns: the result already built from the model named in the annotation, which is
# also where the SDK takes the tool's outputSchema from.
TaskOut = Annotated[CallToolResult, Task]
AcquireOut = Annotated[CallToolResult, AcquireResult]
TaskWithHistoryOut = Annotated[CallToolResult, TaskWithHistory]
TaskPageOut = Annotated[CallToolResult, TaskPage]


def _result(model: BaseModel) -> CallToolResult:
    """``structuredContent`` dumped as the SDK itself would, and a text copy of that same object as
    compact JSON: the model is serialised once, and the agent reads no indentation."""
    structured = model.model_dump(mode="json", by_alias=True)
    text = to_json(structured).decode()
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=structured)


# A handler: sync (run on a worker thread by the SDK) or async (run on the event loop).
_Handler = Callable[..., CallToolResult | Awaitable[CallToolResult]]


class _Tool(Tool):
    """A tool whose argument errors read as one line: pydantic's own report spans several lines per
    error, each with its error type and a documentation link, which an agent does not need. An
    argument the tool does not have is refused, not ignored: a misspelt ``lease`` or ``retry `` would
    otherwise silently take the default."""

    async def run(self, arguments: dict[str, Any], context: Any, convert_result: bool = False) -> Any:
        """Run the tool (see ``Tool.run``); arguments that fail validation are reported in one line."""
        known = self.parameters.get("properties", {})
        unknown = [name for name in arguments if name not in known]
        if unknown:
            names = ", ".join(_short(name) for name in unknown[:_ERRORS_SHOWN])
            raise ToolError(
                f"Error executing tool {self.name}: invalid arguments: unknown argument "
                f"{names}; this tool takes {', '.join(known)}."
            )
        if CALLS.stopping:
            raise ToolError(f"Error executing tool {self.name}: the server is stopping; nothing was done.")
        try:
            with CALLS.one():  # a signal, or the end of stdin, waits for it (see stdio.py)
                return await super().run(arguments, context, convert_result)
        except ToolError as exc:
            cause = exc.__cause__
            # The SDK's own check of the arguments (its model is "<tool>Arguments"), not an error
            # inside the tool, which _tool_errors has already turned into its sentence.
            if isinstance(cause, ValidationError) and cause.title.endswith("Arguments"):
                raise ToolError(f"Error executing tool {self.name}: {_argument_errors(cause)}") from cause
            raise


_ERRORS_SHOWN = 5


def _argument_errors(error: ValidationError) -> str:
    """``invalid arguments: priority: Input should be 'high', 'medium' or 'low' (got 'urgent').``"""
    items = error.errors(include_url=False)
    shown: dict[str, None] = {}  # ordered; a repeated message is shown once
    used = 0
    for item in items:
        if len(shown) == _ERRORS_SHOWN:
            break
        used += 1
        loc = item["loc"]
        # The argument, and positions in a list; not the names of union branches pydantic adds.
        where = str(loc[0]) + "".join(f"[{p}]" for p in loc[1:] if isinstance(p, int)) if loc else "arguments"
        msg = item["msg"].removeprefix("Value error, ")
        got = "" if item["type"] == "missing" else f" (got {_short(item['input'])})"
        shown[f"{where}: {msg}{got}"] = None
    more = f"; and {len(items) - used} more" if used < len(items) else ""
    return "invalid arguments: " + "; ".join(shown) + more + "."


def _short(value: Any, limit: int = 60) -> str:
    """The value as the agent wrote it (JSON), cut short."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Arguments(FuncMetadata):
    """The SDK's argument handling, except that JSON inside a string is decoded only for arguments
    that cannot be a string (``tags`` sent as ``'["a"]'``, as some clients do). A ``result``,
    ``reason`` or ``worker_id`` that happens to read as JSON (``"[1, 2]"``, ``"null"``) stays the
    text that was sent."""

    _text: frozenset[str] = PrivateAttr(default=frozenset())

    @classmethod
    def of(cls, metadata: FuncMetadata) -> _Arguments:
        """The same metadata with this pre-parse; no output model (see ``_tool``)."""
        made = cls(
            arg_model=metadata.arg_model,
            output_schema=metadata.output_schema,
            output_model=None,
            wrap_output=metadata.wrap_output,
        )
        fields = metadata.arg_model.model_fields
        made._text = frozenset(
            key
            for name, info in fields.items()
            if _takes_text(info.annotation)
            for key in (name, info.alias)
            if key is not None
        )
        return made

    def pre_parse_json(self, data: dict[str, Any]) -> dict[str, Any]:
        """See ``FuncMetadata.pre_parse_json``; text arguments are left as sent."""
        parsed = super().pre_parse_json(data)
        return {key: data[key] if key in self._text else value for key, value in parsed.items()}


def _takes_text(annotation: Any) -> bool:
    """True if a string can be a valid value of ``annotation`` (str, a Literal of strings, a union or
    Annotated holding one)."""
    if annotation is str:
        return True
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return any(isinstance(arg, str) for arg in args)
    if origin in (Union, UnionType, Annotated):
        return any(_takes_text(arg) for arg in args)
    return False


def _tool(fn: _Handler, annotations: ToolAnnotations) -> Tool:
    tool = _Tool.from_function(fn, annotations=annotations)
    # The SDK would parse a returned result's structuredContent back into the output model only to
    # check it; ours was dumped from that very model (a third of the cost of a 50-row page). With no
    # output_model, FuncMetadata still publishes output_schema and passes the result through as is.
    tool.fn_metadata = _Arguments.of(tool.fn_metadata)
    return tool


_F = TypeVar("_F", bound=_Handler)


def build_tools() -> list[Tool]:
    """The task tools, for ``MCPServer(tools=...)``."""
    tools: list[Tool] = []

    def register(annotations: ToolAnnotations) -> Callable[[_F], _F]:
        def add(fn: _F) -> _F:
            tools.append(_tool(fn, annotations))
            return fn

        return add

    @register(_write())
    def create_task(
        work_directory: WorkDir,
        prompt: str,
        ctx: Context[AppState],
        priority: PriorityName = "medium",
        tags: list[str] | None = None,
        max_attempts: Annotated[
            int, Count, Field(description="Claims allowed before it fails for good.")
        ] = 3,
    ) -> TaskOut:
        """Queue a task: a prompt for an agent to carry out in work_directory."""
        with _tool_errors("create_task"):
            return _result(
                _service(ctx).create_task(work_directory, prompt, priority, tags or [], max_attempts)
            )

    @register(_write())
    def acquire_task(
        work_directory: WorkDir,
        ctx: Context[AppState],
        worker_id: WorkerId = None,
        lease_seconds: Annotated[int, Count, Field(description="Heartbeat before it ends.")] = 900,
    ) -> AcquireOut:
        """Claim the next task for work_directory (high priority first, then oldest), exclusively.
        Returns {"task": null} when none is pending."""
        with _tool_errors("acquire_task"):
            return _result(
                AcquireResult(task=_service(ctx).acquire_task(work_directory, worker_id, lease_seconds))
            )

    @register(_write(idempotent=True))
    def heartbeat_task(
        task_id: str,
        ctx: Context[AppState],
        worker_id: WorkerId = None,
        lease_seconds: Annotated[
            int | None, Count, Field(description="Default: the last lease length.")
        ] = None,
    ) -> TaskOut:
        """Extend your lease on a task you hold, from now."""
        with _tool_errors("heartbeat_task"):
            return _result(_service(ctx).heartbeat_task(task_id, worker_id, lease_seconds))

    @register(_write())
    def complete_task(
        task_id: str,
        result: Annotated[dict[str, Any] | str, Field(description="A JSON object or a string.")],
        ctx: Context[AppState],
        worker_id: WorkerId = None,
    ) -> TaskOut:
        """Mark a task you hold completed, with its result."""
        with _tool_errors("complete_task"):
            return _result(_service(ctx).complete_task(task_id, result, worker_id))

    @register(_write())
    def fail_task(
        task_id: str,
        error: str,
        ctx: Context[AppState],
        worker_id: WorkerId = None,
        retry: Annotated[bool, Field(description="False: fail for good now.")] = True,
    ) -> TaskOut:
        """Report that a task you hold failed. It returns to pending while attempts remain and retry is
        true; otherwise it is failed for good."""
        with _tool_errors("fail_task"):
            return _result(_service(ctx).fail_task(task_id, error, worker_id, retry))

    @register(_write(destructive=True))
    def cancel_task(task_id: str, ctx: Context[AppState], reason: str | None = None) -> TaskOut:
        """Cancel a pending or in_progress task."""
        with _tool_errors("cancel_task"):
            return _result(_service(ctx).cancel_task(task_id, reason))

    @register(READ)
    async def get_task(task_id: str, ctx: Context[AppState]) -> TaskWithHistoryOut:
        """A task in full (prompt, result, error) with its status history."""
        return await _read(ctx, "get_task", lambda service: service.get_task(task_id))

    @register(READ)
    async def list_tasks(
        ctx: Context[AppState],
        work_directory: str | None = None,
        status: StatusName | None = None,
        tags: Annotated[list[str] | None, Field(description="Tasks having all of these tags.")] = None,
        priority: PriorityName | None = None,
        limit: Annotated[int, Count, Field(description="1 to 200.")] = 50,
        cursor: Annotated[
            str | None, Field(description="next_cursor of the previous page (keeps its filters).")
        ] = None,
    ) -> TaskPageOut:
        """List tasks oldest first, filtered. Prompts are cut to 200 characters; get_task has the rest."""
        return await _read(
            ctx,
            "list_tasks",
            lambda service: service.list_tasks(work_directory, status, tags, priority, limit, cursor),
        )

    return tools
