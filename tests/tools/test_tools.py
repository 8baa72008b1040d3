"""The MCP tool surface through the in-memory SDK client: contract, annotations, errors (both engines)."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from mcp import Client
from mcp.types import CallToolResult, TextContent
from pydantic import BaseModel

from task_orchestrator_mcp.models import AcquireResult, Task, TaskPage, TaskWithHistory
from task_orchestrator_mcp.server import build_server, compact_schema
from task_orchestrator_mcp.settings import Settings
from tests.support import error_text, structured

pytestmark = pytest.mark.anyio

DIR = "/srv/repo"
TOOLS = {
    "create_task", "acquire_task", "heartbeat_task", "complete_task",
    "fail_task", "cancel_task", "get_task", "list_tasks",
}  # fmt: skip


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[Client]:
    """An in-memory client of a server on a fresh database, with a 4 KiB payload limit."""
    settings = Settings(database_url=database_url, worker_id="me", max_payload_bytes=4096)
    async with Client(build_server(settings)) as c:
        yield c


async def call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    """Call a tool that must succeed and return its structured content."""
    return structured(await client.call_tool(tool, args))


async def fails(client: Client, tool: str, **args: Any) -> str:
    """Call a tool that must fail and return its error text."""
    return error_text(await client.call_tool(tool, args))


async def table_snapshot(client: Client) -> dict[str, Any]:
    """Everything a client can see, to show that a rejected call changed nothing."""
    return await call(client, "list_tasks", limit=200)


async def test_server_identity_and_instructions(database_url: str) -> None:
    async with Client(build_server(Settings(database_url=database_url))) as c:
        assert c.server_info is not None
        assert c.server_info.name == "task-orchestrator"
        assert c.instructions is not None
        assert "acquire_task" in c.instructions
        assert "heartbeat_task" in c.instructions


async def test_tool_list_is_exact_lean_and_annotated(client: Client) -> None:
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    for tool in tools.values():
        assert tool.output_schema is not None, tool.name
        assert tool.description
        assert len(tool.description) < 250, tool.name
        assert "title" not in str(tool.input_schema), tool.name
        assert tool.annotations is not None
        assert tool.annotations.open_world_hint is False
    for name in ("get_task", "list_tasks"):
        annotations = tools[name].annotations
        assert annotations is not None
        assert annotations.read_only_hint is True
    for name in ("create_task", "acquire_task", "complete_task", "fail_task", "cancel_task"):
        annotations = tools[name].annotations
        assert annotations is not None
        assert annotations.read_only_hint is False
        assert annotations.idempotent_hint is False
    cancel = tools["cancel_task"].annotations
    assert cancel is not None
    assert cancel.destructive_hint is True
    params = tools["acquire_task"].input_schema["properties"]
    assert set(params) == {"work_directory", "worker_id", "lease_seconds"}
    assert params["lease_seconds"]["default"] == 900
    create = tools["create_task"].input_schema["properties"]
    assert create["priority"]["default"] == "medium"
    assert create["max_attempts"]["default"] == 3
    for tool in tools.values():  # unknown arguments are refused, and the schema says so
        assert tool.input_schema["additionalProperties"] is False, tool.name


async def test_an_unknown_argument_is_refused_and_changes_nothing(client: Client) -> None:
    # A misspelt argument used to be dropped: the call went ahead with the default in its place.
    before = await table_snapshot(client)
    error = await fails(client, "create_task", work_directory=DIR, prompt="p", Priority="high")
    assert error == (
        'Error executing tool create_task: invalid arguments: unknown argument "Priority"; this tool '
        "takes work_directory, prompt, priority, tags, max_attempts."
    )
    assert await table_snapshot(client) == before
    made = await call(client, "create_task", work_directory=DIR, prompt="p")
    await call(client, "acquire_task", work_directory=DIR)
    error = await fails(client, "fail_task", task_id=made["task_id"], error="e", **{"retry ": False})
    assert 'unknown argument "retry "' in error
    assert (await call(client, "get_task", task_id=made["task_id"]))["status"] == "in_progress"


async def test_text_arguments_that_read_as_json_stay_text(client: Client) -> None:
    # The SDK decodes JSON inside string arguments (for clients that send a list as its JSON text);
    # a result, reason or worker id is text even when it reads as JSON.
    for text in ("[1, 2]", '{"pr": 412}', "null", "true"):
        made = await call(client, "create_task", work_directory=DIR, prompt="p", tags='["a", "b"]')
        assert made["tags"] == ["a", "b"]  # a list sent as its JSON text is still decoded
        claimed = await call(client, "acquire_task", work_directory=DIR, worker_id=text)
        assert claimed["task"]["worker_id"] == text
        done = await call(client, "complete_task", task_id=made["task_id"], result=text, worker_id=text)
        assert done["result"] == text
    cancelled = await call(client, "create_task", work_directory=DIR, prompt="p")
    await call(client, "cancel_task", task_id=cancelled["task_id"], reason="null")
    history = (await call(client, "get_task", task_id=cancelled["task_id"]))["history"]
    assert history[-1]["details"] == {"reason": "null"}


async def test_full_worker_loop(client: Client) -> None:
    created = await call(
        client, "create_task", work_directory=DIR, prompt="fix the bug", priority="high", tags=["bug"]
    )
    assert created["status"] == "pending"
    assert created["created_at"].endswith("Z")
    acquired = (await call(client, "acquire_task", work_directory=DIR + "/"))["task"]
    assert acquired["task_id"] == created["task_id"]
    assert acquired["worker_id"] == "me"
    beat = await call(client, "heartbeat_task", task_id=created["task_id"], lease_seconds=60)
    assert beat["lease_expires_at"] is not None
    done = await call(client, "complete_task", task_id=created["task_id"], result={"patch": "diff --git"})
    assert done["status"] == "completed"
    assert done["result"] == {"patch": "diff --git"}
    full = await call(client, "get_task", task_id=created["task_id"])
    assert [h["to_status"] for h in full["history"]] == ["pending", "in_progress", "completed"]
    assert (await call(client, "acquire_task", work_directory=DIR)) == {"task": None}


async def test_fail_and_cancel(client: Client) -> None:
    a = await call(client, "create_task", work_directory=DIR, prompt="a", max_attempts=1)
    await call(client, "acquire_task", work_directory=DIR, worker_id="w9")
    failed = await call(client, "fail_task", task_id=a["task_id"], error="tests red", worker_id="w9")
    assert (failed["status"], failed["error"]) == ("failed", "tests red")
    b = await call(client, "create_task", work_directory=DIR, prompt="b")
    cancelled = await call(client, "cancel_task", task_id=b["task_id"], reason="duplicate")
    assert cancelled["status"] == "cancelled"


async def test_list_pagination_is_stable_and_filters(client: Client) -> None:
    ids = []
    for i in range(7):
        task = await call(
            client,
            "create_task",
            work_directory=f"/d{i % 2}",
            prompt=f"task {i} " + "x" * 500,
            tags=["even"] if i % 2 == 0 else ["odd", "x"],
            priority="low" if i < 3 else "high",
        )
        ids.append(task["task_id"])
    seen: list[str] = []
    cursor = None
    while True:
        page = await call(client, "list_tasks", limit=3, cursor=cursor)
        assert len(page["tasks"]) <= 3
        seen += [t["task_id"] for t in page["tasks"]]
        for item in page["tasks"]:
            assert len(item["prompt"]) == 200
            assert item["prompt_truncated"] is True
            assert "result" not in item
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids
    d0 = await call(client, "list_tasks", work_directory="/d0")
    assert [t["task_id"] for t in d0["tasks"]] == ids[0::2]
    odd = await call(client, "list_tasks", tags=["odd", "x"])
    assert [t["task_id"] for t in odd["tasks"]] == ids[1::2]
    assert (await call(client, "list_tasks", tags=["odd", "even"]))["tasks"] == []
    high = await call(client, "list_tasks", priority="high", status="pending")
    assert [t["task_id"] for t in high["tasks"]] == ids[3:]


async def test_a_cursor_keeps_the_filters_of_its_listing(client: Client) -> None:
    """The next page is asked for with the cursor alone (as the README shows): it continues the
    filtered listing, not an unfiltered one; a cursor with other filters is refused."""
    ids = [
        (await call(client, "create_task", work_directory=DIR, prompt=f"{i}", tags=[tag]))["task_id"]
        for i, tag in enumerate(["backend", "ui", "backend", "ui", "backend"])
    ]
    first = await call(client, "list_tasks", tags=["backend"], work_directory=DIR + "/.", limit=2)
    assert [t["task_id"] for t in first["tasks"]] == [ids[0], ids[2]]
    second = await call(client, "list_tasks", cursor=first["next_cursor"], limit=2)
    assert [t["task_id"] for t in second["tasks"]] == [ids[4]]
    assert second["next_cursor"] is None
    # The same filters again (written differently) are fine; other filters are not.
    same = await call(client, "list_tasks", cursor=first["next_cursor"], work_directory=DIR, tags=["backend"])
    assert [t["task_id"] for t in same["tasks"]] == [ids[4]]
    other = await fails(client, "list_tasks", cursor=first["next_cursor"], tags=["ui"])
    assert "cursor belongs to a listing with other filters" in other


BAD_CALLS: list[tuple[str, dict[str, Any], str]] = [
    ("create_task", {"work_directory": DIR, "prompt": ""}, "prompt must not be empty"),
    ("create_task", {"work_directory": DIR, "prompt": " \n\t "}, "prompt must not be empty"),
    ("create_task", {"work_directory": "relative/dir", "prompt": "p"}, "must be absolute"),
    (
        "create_task",
        {"work_directory": "", "prompt": "p"},
        "work_directory must be a non-empty absolute path",
    ),
    ("create_task", {"work_directory": "/a\x00b", "prompt": "p"}, "NUL"),
    ("create_task", {"work_directory": DIR, "prompt": "a\x00b"}, "NUL"),
    (
        "create_task",
        {"work_directory": DIR, "prompt": "p", "priority": "urgent"},
        "'high', 'medium' or 'low'",
    ),
    (
        "create_task",
        {"work_directory": DIR, "prompt": "p", "max_attempts": -1},
        "max_attempts must be from 1",
    ),
    (
        "create_task",
        {"work_directory": DIR, "prompt": "p", "max_attempts": 10**12},
        "max_attempts must be from 1",
    ),
    ("create_task", {"work_directory": DIR, "prompt": "x" * 5000}, "the limit is 4096 bytes"),
    ("create_task", {"work_directory": DIR, "prompt": "p", "tags": [""]}, "each tag must be a non-empty"),
    (
        "create_task",
        {"work_directory": DIR, "prompt": "p", "tags": [str(i) for i in range(40)]},
        "at most 32",
    ),
    ("create_task", {"work_directory": DIR, "prompt": "p", "tags": "solo"}, "tags"),
    (
        "create_task",
        {"work_directory": DIR, "prompt": "p", "tags": [str(i) for i in range(20_000)]},
        "at most 32 different tags",
    ),
    # pydantic alone would read true as 1 (a 1 s lease, a task that fails for good on its first expiry).
    (
        "create_task",
        {"work_directory": DIR, "prompt": "p", "max_attempts": True},
        "must be a whole number, not true or false",
    ),
    (
        "acquire_task",
        {"work_directory": DIR, "lease_seconds": True},
        "must be a whole number, not true or false",
    ),
    (
        "heartbeat_task",
        {"task_id": "does-not-exist", "lease_seconds": True},
        "must be a whole number, not true or false",
    ),
    ("list_tasks", {"limit": True}, "must be a whole number, not true or false"),
    ("acquire_task", {"work_directory": DIR, "lease_seconds": 0}, "lease_seconds must be from 1"),
    ("acquire_task", {"work_directory": DIR, "lease_seconds": -5}, "lease_seconds must be from 1"),
    ("acquire_task", {"work_directory": DIR, "lease_seconds": 10**9}, "lease_seconds must be from 1"),
    ("acquire_task", {"work_directory": "~/repo"}, "must be absolute"),
    ("acquire_task", {"work_directory": DIR, "worker_id": ""}, "worker_id must be a non-empty"),
    ("get_task", {"task_id": "does-not-exist"}, "No task with id 'does-not-exist'"),
    ("complete_task", {"task_id": "does-not-exist", "result": "x"}, "No task with id"),
    ("complete_task", {"task_id": "t", "result": 42}, "invalid arguments: result: Input should be"),
    ("fail_task", {"task_id": "does-not-exist", "error": "x"}, "No task with id"),
    ("fail_task", {"task_id": "t", "error": ""}, "error must not be empty"),
    ("cancel_task", {"task_id": "does-not-exist"}, "No task with id"),
    ("heartbeat_task", {"task_id": "does-not-exist"}, "No task with id"),
    ("list_tasks", {"status": "done"}, "invalid arguments: status: Input should be 'pending', "),
    (
        "create_task",
        {"work_directory": DIR, "prompt": "p", "priority": "urgent"},
        """priority: Input should be 'high', 'medium' or 'low' (got "urgent")""",
    ),
    ("create_task", {"work_directory": DIR}, "invalid arguments: prompt: Field required."),
    (
        "create_task",
        {"work_directory": DIR, "prompt": "p", "tags": ["a", 5]},
        "tags[1]: Input should be a valid",
    ),
    ("list_tasks", {"limit": 0}, "limit must be from 1 to 200"),
    ("list_tasks", {"limit": 201}, "limit must be from 1 to 200"),
    ("list_tasks", {"cursor": "not-a-cursor"}, "cursor is not valid"),
    ("list_tasks", {"cursor": "WyJ4IiwxXQ"}, "cursor is not valid"),
    # JSON nested past Python's recursion limit, in a forged cursor (was an internal error).
    ("list_tasks", {"cursor": base64.urlsafe_b64encode(b"[" * 5000).decode()}, "cursor is not valid"),
    # Many wrong items: the first few errors, then how many more (each reported once).
    (
        "create_task",
        {"work_directory": DIR, "prompt": "p", "tags": list(range(40_000))},
        "; and 39995 more.",
    ),
    # Filters forged into a cursor meet the same checks as arguments.
    (
        "list_tasks",
        {"cursor": "WyIyMDI2LTAxLTAxVDAwOjAwOjAwKzAwOjAwIiwieCIseyJkIjoicmVsIiwidCI6W119XQ"},
        "cursor is not valid",
    ),
    ("list_tasks", {"work_directory": "rel"}, "must be absolute"),
]


@pytest.mark.parametrize(
    ("tool", "args", "expected"), BAD_CALLS, ids=[f"{t}-{e[:24]}" for t, _, e in BAD_CALLS]
)
async def test_bad_input_is_a_clear_error_and_changes_nothing(
    client: Client, tool: str, args: dict[str, Any], expected: str
) -> None:
    await call(client, "create_task", work_directory="/other", prompt="bystander")
    before = await table_snapshot(client)
    message = await fails(client, tool, **args)
    assert expected in message
    assert "\n" not in message, message  # one line, whether the SDK or the service refused it
    for leak in (
        "Traceback",
        "SELECT",
        "INSERT",
        "UPDATE",
        "sqlalchemy",
        "psycopg",
        'File "',
        "pydantic.dev",
    ):
        assert leak not in message
    assert await table_snapshot(client) == before


async def test_oversized_and_invalid_results_are_refused_and_task_stays_held(client: Client) -> None:
    task = await call(client, "create_task", work_directory=DIR, prompt="p")
    await call(client, "acquire_task", work_directory=DIR)
    too_big = await fails(client, "complete_task", task_id=task["task_id"], result={"blob": "y" * 5000})
    assert "the limit is 4096 bytes" in too_big
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(100):
        node["n"] = {}
        node = node["n"]
    assert "deeper than" in await fails(client, "complete_task", task_id=task["task_id"], result=deep)
    nul = await fails(client, "complete_task", task_id=task["task_id"], result={"k": "a\x00b"})
    assert "NUL" in nul
    still = await call(client, "get_task", task_id=task["task_id"])
    assert (still["status"], still["result"]) == ("in_progress", None)


async def test_wrong_holder_gets_actionable_refusal(client: Client) -> None:
    task = await call(client, "create_task", work_directory=DIR, prompt="p")
    await call(client, "acquire_task", work_directory=DIR, worker_id="alice")
    message = await fails(client, "complete_task", task_id=task["task_id"], result="x", worker_id="bob")
    assert "held by worker 'alice'" in message
    again = await fails(client, "complete_task", task_id=task["task_id"], result="x")
    assert "held by worker 'alice', not 'me'" in again


def _text_and_structured(result: CallToolResult) -> tuple[str, dict[str, Any]]:
    assert not result.is_error, result.content
    assert len(result.content) == 1
    block = result.content[0]
    assert isinstance(block, TextContent)
    assert result.structured_content is not None
    return block.text, result.structured_content


async def test_text_content_is_the_structured_content_as_compact_json(client: Client) -> None:
    created = await client.call_tool(
        "create_task", {"work_directory": DIR, "prompt": "réparer le bug, vite", "tags": ["a b", "ü"]}
    )
    task_id = structured(created)["task_id"]
    results = [
        created,
        await client.call_tool("acquire_task", {"work_directory": DIR}),
        await client.call_tool("heartbeat_task", {"task_id": task_id}),
        await client.call_tool(
            "complete_task", {"task_id": task_id, "result": {"k": [1, 2.5, None, "v, w"]}}
        ),
        await client.call_tool("get_task", {"task_id": task_id}),
        await client.call_tool("list_tasks", {}),
        await client.call_tool("acquire_task", {"work_directory": DIR}),
    ]
    failing = (await call(client, "create_task", work_directory="/other", prompt="to fail"))["task_id"]
    cancelling = (await call(client, "create_task", work_directory="/else", prompt="to cancel"))["task_id"]
    await call(client, "acquire_task", work_directory="/other")
    results.append(await client.call_tool("fail_task", {"task_id": failing, "error": "tests red"}))
    results.append(await client.call_tool("cancel_task", {"task_id": cancelling, "reason": "dup"}))
    for result in results:
        text, content = _text_and_structured(result)
        assert json.loads(text) == content
        assert text == json.dumps(content, ensure_ascii=False, separators=(",", ":"))


OUTPUT_MODELS: dict[str, type[BaseModel]] = {
    "create_task": Task, "acquire_task": AcquireResult, "heartbeat_task": Task, "complete_task": Task,
    "fail_task": Task, "cancel_task": Task, "get_task": TaskWithHistory, "list_tasks": TaskPage,
}  # fmt: skip


async def test_output_schema_is_the_model_schema(client: Client) -> None:
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(OUTPUT_MODELS) == set(tools)
    for name, model in OUTPUT_MODELS.items():
        expected = compact_schema(model.model_json_schema(), keep_descriptions=False)
        assert tools[name].output_schema == expected, name


async def test_schemas_are_self_contained_and_still_validate(client: Client) -> None:
    """No $ref/$defs left for a client to resolve per row, and the folded forms mean the same."""
    from jsonschema import Draft202012Validator

    tools = {t.name: t for t in (await client.list_tools()).tools}
    for tool in tools.values():
        dumped = json.dumps([tool.input_schema, tool.output_schema])
        assert "$ref" not in dumped
        assert "$defs" not in dumped
        Draft202012Validator.check_schema(tool.input_schema)
        Draft202012Validator.check_schema(tool.output_schema or {})
    history = Draft202012Validator(tools["get_task"].output_schema or {})
    made = await call(client, "create_task", work_directory=DIR, prompt="p")
    shown = await call(client, "get_task", task_id=made["task_id"])
    assert shown["history"][0]["from_status"] is None
    assert list(history.iter_errors(shown)) == []
    shown["history"][0]["from_status"] = "nonsense"
    assert list(history.iter_errors(shown)) != []
