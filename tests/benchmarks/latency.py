"""Part 2, per-call latency over stdio with the SDK client, against the bare floor server."""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from mcp import Client, StdioServerParameters
from mcp.types import CallToolResult

from tests.benchmarks.common import Result, Workspace, load_tasks, percentile, sqlite_url, task_rows
from tests.benchmarks.rawrpc import RawStdio
from tests.benchmarks.startup import FLOOR_SCRIPT
from tests.support import server_env, server_params, structured

LIST_DIR = "/bench/list"
CLAIM_DIR = "/bench/claim"
CREATE_DIR = "/bench/create"


async def _time_block(call: Callable[[], Awaitable[Any]], count: int, into: list[float]) -> None:
    for _ in range(count):
        started = time.perf_counter()
        await call()
        into.append(time.perf_counter() - started)


# A pause before each block: the real server checkpoints its WAL on a thread once it has been quiet
# for 50 ms, and that disk work must not land inside the other server's timed block.
BLOCK_PAUSE_SECONDS = 0.1


async def _interleaved(
    real: Callable[[], Awaitable[Any]], floor: Callable[[], Awaitable[Any]], count: int, block: int = 50
) -> tuple[list[float], list[float]]:
    """Alternate blocks of real and floor calls, so a noisy neighbour hits both alike."""
    for call in (real, floor):
        for _ in range(20):  # warm-up
            await call()
    real_samples: list[float] = []
    floor_samples: list[float] = []
    while len(real_samples) < count:
        n = min(block, count - len(real_samples))
        for call, samples in ((real, real_samples), (floor, floor_samples)):
            await anyio.sleep(BLOCK_PAUSE_SECONDS)
            await _time_block(call, n, samples)
    return real_samples, floor_samples


def _check(result: Any) -> Any:
    return structured(result)


Samples = dict[str, tuple[list[float], list[float]]]


async def measure(ws: Workspace, calls: int) -> tuple[Samples, dict[str, float]]:
    """Samples (real, floor) per operation, both servers open side by side; and for the reads and the
    no-op, how long the SDK client's own check of one result takes."""
    floor_db = ws.migrated_copy("floor-latency")
    floor_env = server_env(sqlite_url(floor_db), BENCH_FLOOR_DB=str(floor_db))
    floor_params = StdioServerParameters(command=sys.executable, args=[str(FLOOR_SCRIPT)], env=floor_env)
    url = sqlite_url(ws.migrated_copy("latency"))
    load_tasks(url, task_rows(60, LIST_DIR, prefix="l"))
    # Every acquire of the timed loop (and its warm-up) finds a pending task.
    load_tasks(url, task_rows(calls + 100, CLAIM_DIR, prefix="c"))
    async with Client(floor_params, mode="legacy") as fc, Client(server_params(url), mode="legacy") as client:
        # A task with a full history (created, claimed, completed) for get_task.
        made = _check(await client.call_tool("create_task", {"work_directory": "/bench/get", "prompt": "x"}))
        task_id = made["task_id"]
        _check(await client.call_tool("acquire_task", {"work_directory": "/bench/get"}))
        _check(await client.call_tool("complete_task", {"task_id": task_id, "result": {"ok": True}}))

        async def noop() -> None:
            _check(await fc.call_tool("noop", {}))

        async def commit() -> None:
            _check(await fc.call_tool("noop_commit", {}))

        async def commit_twice() -> None:
            await commit()
            await commit()

        async def get_task() -> None:
            _check(await client.call_tool("get_task", {"task_id": task_id}))

        async def list_tasks() -> None:
            page = _check(await client.call_tool("list_tasks", {"work_directory": LIST_DIR, "limit": 50}))
            assert len(page["tasks"]) == 50

        async def create_task() -> None:
            args = {"work_directory": CREATE_DIR, "prompt": "do the thing"}
            _check(await client.call_tool("create_task", args))

        async def acquire_complete() -> None:
            got = _check(await client.call_tool("acquire_task", {"work_directory": CLAIM_DIR}))
            assert got["task"] is not None
            done = {"task_id": got["task"]["task_id"], "result": "done"}
            _check(await client.call_tool("complete_task", done))

        samples = {
            "get_task/noop": await _interleaved(get_task, noop, calls),
            "list_tasks (50 rows)/noop": await _interleaved(list_tasks, noop, calls),
            "create_task/noop_commit": await _interleaved(create_task, commit, calls),
            "acquire+complete/noop_commit x2": await _interleaved(acquire_complete, commit_twice, calls),
        }
        checks = {
            "get_task": await _check_seconds(client, "get_task", {"task_id": task_id}),
            "list_tasks (50 rows)": await _check_seconds(
                client, "list_tasks", {"work_directory": LIST_DIR, "limit": 50}
            ),
            "noop": await _check_seconds(fc, "noop", {}),
        }
        return samples, checks


async def _check_seconds(client: Client, tool: str, arguments: dict[str, Any], rounds: int = 200) -> float:
    """Median time the SDK client takes to check one result of ``tool`` against the tool's output
    schema (``validate_tool_result``, which its ``call_tool`` runs on every result), in process."""
    result = await client.call_tool(tool, arguments)
    assert isinstance(result, CallToolResult)
    assert not result.is_error
    samples: list[float] = []
    await _time_block(lambda: client.session.validate_tool_result(tool, result), rounds, samples)
    return percentile(samples, 50)


def _time_sync(call: Callable[[], Any], count: int, into: list[float]) -> None:
    for _ in range(count):
        started = time.perf_counter()
        call()
        into.append(time.perf_counter() - started)


def _interleaved_sync(
    real: Callable[[], Any], floor: Callable[[], Any], count: int, block: int = 50
) -> tuple[list[float], list[float]]:
    for call in (real, floor):
        for _ in range(20):
            call()
    real_samples: list[float] = []
    floor_samples: list[float] = []
    while len(real_samples) < count:
        n = min(block, count - len(real_samples))
        for call, samples in ((real, real_samples), (floor, floor_samples)):
            time.sleep(BLOCK_PAUSE_SECONDS)
            _time_sync(call, n, samples)
    return real_samples, floor_samples


def measure_raw(ws: Workspace, calls: int) -> Samples:
    """The same operations through a bare JSON-RPC pipe client: the server's cost without the SDK's."""
    floor_db = ws.migrated_copy("floor-latency-raw")
    floor_env = server_env(sqlite_url(floor_db), BENCH_FLOOR_DB=str(floor_db))
    url = sqlite_url(ws.migrated_copy("latency-raw"))
    load_tasks(url, task_rows(60, LIST_DIR, prefix="l"))
    load_tasks(url, task_rows(calls + 100, CLAIM_DIR, prefix="c"))
    real_cmd = [sys.executable, "-m", "task_orchestrator_mcp"]
    floor_cmd = [sys.executable, str(FLOOR_SCRIPT)]
    with (
        RawStdio(floor_cmd, floor_env) as fc,
        RawStdio(floor_cmd, {**floor_env, "BENCH_FLOOR_WIRE": "ours"}) as wc,
        RawStdio(real_cmd, server_env(url)) as rc,
    ):
        task_id = rc.call("create_task", {"work_directory": "/bench/get", "prompt": "x"})["task_id"]
        rc.call("acquire_task", {"work_directory": "/bench/get"})
        rc.call("complete_task", {"task_id": task_id, "result": {"ok": True}})

        def acquire_complete() -> None:
            got = rc.call("acquire_task", {"work_directory": CLAIM_DIR})["task"]
            rc.call("complete_task", {"task_id": got["task_id"], "result": "done"})

        def noop() -> None:
            fc.call("noop", {})

        def commit() -> None:
            fc.call("noop_commit", {})

        def commit_twice() -> None:
            commit()
            commit()

        return {
            "get_task/noop": _interleaved_sync(
                lambda: rc.call("get_task", {"task_id": task_id}), noop, calls
            ),
            "list_tasks (50 rows)/noop": _interleaved_sync(
                lambda: rc.call("list_tasks", {"work_directory": LIST_DIR, "limit": 50}), noop, calls
            ),
            "create_task/noop_commit": _interleaved_sync(
                lambda: rc.call("create_task", {"work_directory": CREATE_DIR, "prompt": "do the thing"}),
                commit,
                calls,
            ),
            "acquire+complete/noop_commit x2": _interleaved_sync(acquire_complete, commit_twice, calls),
            WIRE: _interleaved_sync(lambda: wc.call("noop", {}), noop, calls),
        }


# The no-op on the floor server served through the real server's stdio wire, against the same no-op
# on the SDK's: what the wire alone saves each call (reported, no goal).
WIRE = "noop, served by this server's stdio wire/noop on the SDK's"


def _rows(client: str, measured: Samples, calls: int) -> list[Result]:
    results = []
    for key, (real, floor) in measured.items():
        name, floor_name = key.split("/")
        for q in (50, 99):
            value = percentile(real, q) * 1000
            base = percentile(floor, q) * 1000
            row = Result(f"latency ({client})", f"{name} p{q} (floor: {floor_name})", "ms", value, base)
            row.extra["calls"] = calls
            if key != WIRE:
                row.goal, row.ok = "<= 1.3x", value / base <= 1.3
            results.append(row)
    return results


def _check_rows(measured: Samples, checks: dict[str, float]) -> list[Result]:
    """The SDK client's check of one result, against the floor's p50: with a goal of 1.3x, a read
    whose check alone (less the no-op's own) takes more than 0.3 of the floor cannot meet it, however
    fast the server."""
    floor_p50 = percentile(measured["get_task/noop"][1], 50) * 1000
    return [
        Result(
            "latency (SDK client)",
            f"{name}: the client's schema check of one result (vs noop p50)",
            "ms",
            seconds * 1000,
            floor_p50,
            extra={"note": "in process, median of 200"},
        )
        for name, seconds in checks.items()
    ]


async def run(ws: Workspace, *, calls: int) -> list[Result]:
    """p50 and p99 of each tool over ``calls`` calls against its floor: SDK client, then raw JSON-RPC;
    and what the SDK client's check of each read's result costs on its own."""
    measured, checks = await measure(ws, calls)
    sdk = _rows("SDK client", measured, calls) + _check_rows(measured, checks)
    return sdk + _rows("raw rpc", measure_raw(ws, calls), calls)
