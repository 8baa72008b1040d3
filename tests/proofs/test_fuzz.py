"""Fuzz proof of the tool surface: hypothesis-generated arguments for every tool, through the in-memory
MCP client on both engines and through the real server process over stdio.

Arguments mix plausible values with anything at all: wrong JSON types, empty and huge strings (past the
1 MiB payload limit), unicode edge cases (lone surrogates, BOM, RTL override, combining marks, the
last code point), NUL bytes, nested and very deep JSON, negative and enormous numbers, NaN, and extra
unknown arguments. Every call must end in a result or a *clear* isError, within a time limit:

- never the SDK's bare "Error executing tool X" (an unhandled exception) nor the server's own
  "Internal error" line (an exception the service did not turn into a sentence);
- never a traceback, driver name or SQL text in the message;
- a rejected call leaves every table exactly as it was (a full snapshot before and after);
- a successful call returns what the tool's output model promises.

The stdio round cannot send lone surrogates or JSON nested deeper than the client's serialiser allows
(the SDK client refuses them before anything reaches the server), so it uses surrogate-free text and
shallower nesting.

    pytest tests/proofs/test_fuzz.py                          # CI size: ~1,000 calls, ~17 s of CPU
    TASK_ORCHESTRATOR_SOAK=1 pytest tests/proofs/test_fuzz.py   # soak: ~20x the examples
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mcp import Client
from mcp.types import CallToolResult
from pydantic import BaseModel
from sqlalchemy import create_engine

from task_orchestrator_mcp.models import AcquireResult, Task, TaskPage, TaskWithHistory
from task_orchestrator_mcp.server import build_server
from task_orchestrator_mcp.settings import Settings
from tests.proofs.support import incompressible, quiet_logs, snapshot, soak
from tests.support import server_params

# A call that takes longer than this is a hang (generous: 2 loaded cores, megabyte payloads).
HANG_SECONDS = 60
SCALE = 20 if soak() else 1

OUTPUT_MODELS: dict[str, type[BaseModel]] = {
    "create_task": Task,
    "acquire_task": AcquireResult,
    "heartbeat_task": Task,
    "complete_task": Task,
    "fail_task": Task,
    "cancel_task": Task,
    "get_task": TaskWithHistory,
    "list_tasks": TaskPage,
}
TOOLS = sorted(OUTPUT_MODELS)

# What must never reach an agent: Python tracebacks, driver or ORM names, SQL.
LEAKS = re.compile(
    r"Traceback|File \"|\.py\", line|sqlalchemy|psycopg|sqlite3|pysqlite|Background on this error|"
    r"\bSELECT\b.*\bFROM\b|\bINSERT INTO\b|\bUPDATE tasks\b|\bDELETE FROM\b|DETAIL:",
    re.IGNORECASE | re.DOTALL,
)
GENERIC = re.compile(r"\s*Error executing tool \w+\s*:?\s*")


# -- strategies ---------------------------------------------------------------------------------------


NASTY = [
    "",
    " ",
    "\t\n ",
    "\x00",
    "a\x00b",
    "/work/a\x00",
    "\ufeff",
    "/work/\u202eevil",
    "e\u0301",
    "\U0001f600",
    "\U0010ffff",
    "\ufffe",
    "null",
    "None",
    "NaN",
    "-1",
    "1e999",
    "relative/dir",
    "../etc",
    "/work/../../..",
    "//",
    "/",
    "'; DROP TABLE tasks; --",
    '{"a": 1}',
    "%s%n",
    "high ",
    "x" * 300,
]
SURROGATES = ["\ud800", "a\udfff", "/work/\udc80"]
# Huge strings, named by a short key so strategy reprs (which hypothesis builds) stay small.
HUGE: dict[str, Callable[[], str]] = {
    "64KiB": lambda: "x" * 2**16,
    "1MiB+1": lambda: "p" * (2**20 + 1),
    "1MiB+ spaces": lambda: " " * (2**20 + 10),
    "dir 5000": lambda: "/" + "a" * 5000,
    "dir e-acute 3000": lambda: "/" + "\u00e9" * 3000,
    "dir CJK 1400": lambda: "/" + incompressible(1400),
    "dir CJK 4000": lambda: "/" + incompressible(4000),
}
NUMBERS = [
    0,
    1,
    -1,
    2,
    99,
    100,
    101,
    199,
    200,
    201,
    604_800,
    604_801,
    2**31,
    2**53 + 1,
    2**63,
    -(2**63) - 1,
    2**64,
]


@dataclass(frozen=True)
class Seeds:
    """Real values to fuzz around: ids of tasks in several states, a valid cursor."""

    task_ids: list[str]
    cursor: str


class Strategies:
    """Argument strategies for every tool, built once; ``surrogates``/``max_depth`` fit the transport.

    Most examples are a plausible call with one or two parameters spoiled (a wrong type, a nasty value,
    a missing required argument, an unknown extra), so the fuzz reaches the service's own checks and
    not only the SDK's type validation.
    """

    def __init__(self, seeds: Seeds, *, surrogates: bool, max_depth: int) -> None:
        self.seeds = seeds
        self.surrogates = surrogates
        self.max_depth = max_depth
        self._tools = {tool: self._build(tool) for tool in TOOLS}

    def for_tool(self, tool: str) -> st.SearchStrategy[dict[str, Any]]:
        """Arguments for one tool."""
        return self._tools[tool]

    def _alphabet(self) -> st.SearchStrategy[str]:
        # Lone surrogates (category Cs) only where the transport can carry them.
        return (
            st.characters(exclude_categories=[])
            if self.surrogates
            else st.characters(exclude_categories=["Cs"])
        )

    def _text(self) -> st.SearchStrategy[str]:
        alphabet = self._alphabet()
        samples = NASTY + (SURROGATES if self.surrogates else [])
        huge = st.sampled_from(sorted(HUGE)).map(lambda key: HUGE[key]())
        return st.one_of(st.text(alphabet, max_size=40), st.sampled_from(samples), huge)

    def _small_text(self) -> st.SearchStrategy[str]:
        alphabet = self._alphabet()
        return st.one_of(st.text(alphabet, min_size=1, max_size=10), st.sampled_from(NASTY[:20]))

    def _numbers(self) -> st.SearchStrategy[int | float]:
        return st.one_of(
            st.sampled_from(NUMBERS),
            st.integers(-(2**70), 2**70),
            st.floats(allow_nan=True, allow_infinity=True),
        )

    def _deep(self) -> st.SearchStrategy[Any]:
        def nest(depth: int, as_list: bool) -> Any:
            value: Any = "leaf"
            for _ in range(depth):
                value = [value] if as_list else {"k": value}
            return value

        return st.builds(nest, st.integers(1, self.max_depth), st.booleans())

    def _any_json(self) -> st.SearchStrategy[Any]:
        scalars = st.one_of(st.none(), st.booleans(), self._numbers(), self._text())
        # Object keys never hold lone surrogates: the SDK client cannot serialise such a key on any
        # transport (pydantic refuses it before the request is sent), so it would test the client.
        keys = st.one_of(
            st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=10),
            st.sampled_from(NASTY[:20]),
        )

        def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
            return st.one_of(st.lists(children, max_size=3), st.dictionaries(keys, children, max_size=3))

        nested = st.recursive(scalars, containers, max_leaves=8)
        return st.one_of(nested, self._deep())

    def _build(self, tool: str) -> st.SearchStrategy[dict[str, Any]]:
        text = self._text()
        directory = st.one_of(st.sampled_from(["/work/a", "/work/./a/", "/work/b", "/"]), text)
        worker = st.one_of(st.none(), st.sampled_from(["w1", "w2"]), text)
        task_id = st.one_of(st.sampled_from(self.seeds.task_ids), text)
        count = st.one_of(st.integers(1, 5), st.sampled_from(NUMBERS))
        priority = st.sampled_from(["high", "medium", "low"])
        status = st.sampled_from(["pending", "in_progress", "completed", "failed", "cancelled"])
        cursor = st.one_of(st.just(self.seeds.cursor), text, st.sampled_from(CURSORS))
        tags = st.lists(self._small_text(), max_size=40)
        result = st.one_of(
            text, st.dictionaries(self._small_text(), self._any_json(), max_size=4), self._deep()
        )
        # (plausible strategy, required?)
        every: dict[str, dict[str, tuple[st.SearchStrategy[Any], bool]]] = {
            "create_task": {
                "work_directory": (directory, True),
                "prompt": (text, True),
                "priority": (priority, False),
                "tags": (tags, False),
                "max_attempts": (count, False),
            },
            "acquire_task": {
                "work_directory": (directory, True),
                "worker_id": (worker, False),
                "lease_seconds": (count, False),
            },
            "heartbeat_task": {
                "task_id": (task_id, True),
                "worker_id": (worker, False),
                "lease_seconds": (st.one_of(st.none(), count), False),
            },
            "complete_task": {
                "task_id": (task_id, True),
                "result": (result, True),
                "worker_id": (worker, False),
            },
            "fail_task": {
                "task_id": (task_id, True),
                "error": (text, True),
                "worker_id": (worker, False),
                "retry": (st.booleans(), False),
            },
            "cancel_task": {"task_id": (task_id, True), "reason": (st.one_of(st.none(), text), False)},
            "get_task": {"task_id": (task_id, True)},
            "list_tasks": {
                "work_directory": (st.one_of(st.none(), directory), False),
                "status": (st.one_of(st.none(), status), False),
                "tags": (st.one_of(st.none(), tags), False),
                "priority": (st.one_of(st.none(), priority), False),
                "limit": (count, False),
                "cursor": (st.one_of(st.none(), cursor), False),
            },
        }
        params = every[tool]
        plausible: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
            {name: strategy for name, (strategy, required) in params.items() if required},
            optional={name: strategy for name, (strategy, required) in params.items() if not required},
        )
        anything = self._any_json()
        spoil = st.one_of(
            st.tuples(st.sampled_from(sorted(params)), anything),  # a wrong type or value
            st.tuples(st.sampled_from(sorted(params)), st.just(_DROP)),  # a missing argument
            st.tuples(
                st.one_of(st.sampled_from(["extra", "taskId", "__proto__", "", "ctx"]), self._small_text()),
                anything,
            ),
        )
        return st.builds(_spoil, plausible, st.lists(spoil, max_size=2))


_DROP = object()


def _spoil(arguments: dict[str, Any], changes: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(arguments)
    for name, value in changes:
        if value is _DROP:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def _cursor(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# Cursors that decode but carry nonsense: wrong shapes, out-of-range instants, odd ids.
CURSORS = [
    _cursor(b'["2026-01-01T00:00:00+00:00","\\ud800"]'),
    _cursor(b'["0001-01-01T00:00:00+05:00","x"]'),
    _cursor(b'["9999-12-31T23:59:59-05:00","x"]'),
    _cursor(b'["2026-01-01T00:00:00",  "x"]'),
    _cursor(b'["2026-01-01T00:00:00+00:00", 5]'),
    _cursor(b'["2026-01-01T00:00:00+00:00", "' + b"y" * 400 + b'"]'),
    _cursor(b'{"a": 1}'),
    _cursor(b"[1, 2, 3]"),
    _cursor(b"\xff\xfe"),
    "====",
    "!!!!",
]


# -- the harness --------------------------------------------------------------------------------------


class Session:
    """One MCP client (driven from sync code through an anyio portal) and a snapshot engine."""

    def __init__(self, portal: BlockingPortal, client: Client, database_url: str) -> None:
        self._portal = portal
        self._client = client
        self._engine = create_engine(database_url)
        self.calls = 0
        self.rejected = 0
        # Rejections by the SDK's argument validation (wrong types) rather than by the service's rules.
        self.rejected_by_schema = 0

    def summary(self) -> str:
        """Counts for the run's summary line (shown with ``pytest -s``)."""
        return (
            f"{self.calls} calls, {self.rejected} rejected "
            f"({self.rejected_by_schema} by argument validation, the rest by the service)"
        )

    def close(self) -> None:
        """Dispose of the snapshot engine."""
        self._engine.dispose()

    def call(self, tool: str, arguments: dict[str, Any]) -> CallToolResult:
        """Call a tool; a call that does not answer within HANG_SECONDS fails the test as a hang."""

        async def bounded() -> CallToolResult:
            with anyio.fail_after(HANG_SECONDS):
                return await self._client.call_tool(tool, arguments)

        self.calls += 1
        return self._portal.call(bounded)

    def ok(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """A call that must succeed; its structured content."""
        result = self.call(tool, arguments)
        assert not result.is_error, _text(result)
        content: dict[str, Any] | None = result.structured_content
        assert content is not None
        return content

    def check(self, tool: str, arguments: dict[str, Any]) -> None:
        """The fuzz property for one call (see the module docstring)."""
        before = snapshot(self._engine)
        result = self.call(tool, arguments)
        if not result.is_error:
            assert result.structured_content is not None, "a successful call returned no structured content"
            OUTPUT_MODELS[tool].model_validate(result.structured_content)
            return
        self.rejected += 1
        message = _text(result)
        self.rejected_by_schema += "invalid arguments:" in message
        assert_clear_error(tool, message)
        assert snapshot(self._engine) == before, f"rejected call changed the database: {message}"


def assert_clear_error(tool: str, message: str) -> None:
    """An isError message must give a reason, and leak nothing internal."""
    assert message.strip(), "empty error message"
    assert not GENERIC.fullmatch(message), f"bare SDK error (unhandled exception in {tool}): {message!r}"
    assert "Internal error" not in message, f"unexpected exception in {tool}: {message!r}"
    assert not LEAKS.search(message), f"internal detail leaked: {message[:500]!r}"


def _text(result: CallToolResult) -> str:
    return " ".join(getattr(block, "text", "") for block in result.content)


@contextmanager
def session_for(server: Any, database_url: str, **client_options: Any) -> Iterator[Session]:
    """A Session on ``server`` (an MCPServer or stdio parameters), torn down on exit."""
    with start_blocking_portal("asyncio") as portal:
        client = Client(server, **client_options)
        with portal.wrap_async_context_manager(client):
            session = Session(portal, client, database_url)
            try:
                yield session
            finally:
                session.close()


def seed(session: Session) -> Seeds:
    """Tasks in every interesting state, and a real cursor, for the fuzzer to aim at."""
    ids = []
    for n in range(4):
        ids.append(session.ok("create_task", {"work_directory": "/work/a", "prompt": f"seed {n}"})["task_id"])
    session.ok("acquire_task", {"work_directory": "/work/a", "worker_id": "w1"})
    session.ok("acquire_task", {"work_directory": "/work/a", "worker_id": "w2"})
    session.ok("complete_task", {"task_id": ids[1], "worker_id": "w2", "result": {"ok": True}})
    session.ok("cancel_task", {"task_id": ids[3], "reason": "seed"})
    cursor = session.ok("list_tasks", {"limit": 1})["next_cursor"]
    assert isinstance(cursor, str)
    return Seeds(task_ids=ids, cursor=cursor)


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def _fuzz(session: Session, strategies: Strategies, tools: list[str], examples: int) -> None:
    @given(data=st.data())
    @_settings(examples)
    def run(data: st.DataObject) -> None:
        tool = data.draw(st.sampled_from(tools), label="tool")
        arguments = data.draw(strategies.for_tool(tool), label="arguments")
        session.check(tool, arguments)

    run()


# -- the tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("tool", TOOLS)
def test_fuzz_tool_in_memory(tool: str, database_url: str, engine_name: str) -> None:
    """Every tool, in-memory client: a result or a clear isError; rejected calls change nothing."""
    settings_ = Settings(database_url=database_url)
    with quiet_logs(), session_for(build_server(settings_), database_url) as session:
        strategies = Strategies(seed(session), surrogates=True, max_depth=200)
        _fuzz(session, strategies, [tool], 80 if engine_name == "sqlite" else 30)
        print(f"\n{tool} on {engine_name}: {session.summary()}")


def test_fuzz_stdio_round(tmp_path: Path) -> None:
    """A smaller round through the real server process: the same property with JSON on the wire."""
    url = f"sqlite:///{tmp_path / 'tasks.db'}"
    with session_for(server_params(url), url, mode="legacy") as session:
        strategies = Strategies(seed(session), surrogates=False, max_depth=120)
        _fuzz(session, strategies, TOOLS, 120)
        # The server is still serving after all of it.
        assert session.ok("list_tasks", {"limit": 1})["tasks"]
        print(f"\nstdio: {session.summary()}")
