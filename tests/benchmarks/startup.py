"""Part 1, cold start: spawn to the ``initialize`` answer, real server against the bare floor server."""

from __future__ import annotations

import compileall
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import task_orchestrator_mcp
from tests.benchmarks.common import Result, Workspace, sqlite_url
from tests.support import server_env

FLOOR_SCRIPT = Path(__file__).with_name("floor_server.py")
PACKAGE_DIR = Path(task_orchestrator_mcp.__file__).parent
INITIALIZE = (
    json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "bench", "version": "0"},
            },
        }
    )
    + "\n"
).encode()


TOOLS_LIST = (
    json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"})
    + "\n"
    + json.dumps({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
    + "\n"
).encode()


def _first_call(tool: str, arguments: dict[str, object]) -> bytes:
    request = {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "tools/call",
        "params": {"name": tool, "arguments": arguments},
    }
    return (json.dumps(request) + "\n").encode()


# The first tool call of a session: the real server's waits for its database to be open (it answers
# initialize and tools/list meanwhile); the floor's no-op has no database.
FIRST_CALL = {"floor": _first_call("noop", {}), "real": _first_call("list_tasks", {"limit": 1})}


def spawn_to_initialize(
    command: list[str], env: dict[str, str], first_call: bytes
) -> tuple[float, float, float]:
    """Seconds from spawning ``command`` to its ``initialize`` answer, to its ``tools/list`` answer
    (what an agent session really waits for before its first call), and to the answer of
    ``first_call`` made right after (ready to work: the database open)."""
    started = time.perf_counter()
    # As a context manager, Popen closes the pipes and waits for the process however this ends.
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write(INITIALIZE)
        proc.stdin.flush()
        line = proc.stdout.readline()
        initialized = time.perf_counter() - started
        proc.stdin.write(TOOLS_LIST)
        proc.stdin.flush()
        tools = proc.stdout.readline()
        listed = time.perf_counter() - started
        proc.stdin.write(first_call)
        proc.stdin.flush()
        called = proc.stdout.readline()
        answered = time.perf_counter() - started
        proc.stdin.close()
        proc.wait(timeout=30)
    if b'"result"' not in line or b'"tools"' not in tools or b'"isError":false' not in called:
        raise RuntimeError(
            f"{command}: no initialize/tools/call result: {line[:300]!r} {tools[:300]!r} {called[:300]!r}"
        )
    return initialized, listed, answered


def run(ws: Workspace, *, repeats: int) -> list[Result]:
    """Median spawn-to-initialize of the real server (module and console script) and of the floor,
    plus spawn-to-tools/list and spawn-to-first-tool-result (reported, no goal)."""
    # As a wheel install leaves it: the package's bytecode compiled. (An editable checkout under
    # PYTHONDONTWRITEBYTECODE=1 would otherwise compile every module on every spawn.)
    compileall.compile_dir(str(PACKAGE_DIR), quiet=1)
    db = ws.migrated_copy("coldstart")
    env = server_env(sqlite_url(db))
    script = shutil.which("task-orchestrator-mcp", path=str(Path(sys.executable).parent))
    commands = {
        "floor": [sys.executable, str(FLOOR_SCRIPT)],
        "python -m task_orchestrator_mcp": [sys.executable, "-m", "task_orchestrator_mcp"],
    }
    if script:
        commands["task-orchestrator-mcp"] = [script]
    first = {name: FIRST_CALL["floor" if name == "floor" else "real"] for name in commands}
    # One warm-up each (page cache, .pyc), then interleaved so noise hits all of them alike.
    for name, command in commands.items():
        spawn_to_initialize(command, env, first[name])
    init: dict[str, list[float]] = {name: [] for name in commands}
    listed: dict[str, list[float]] = {name: [] for name in commands}
    ready: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeats):
        for name, command in commands.items():
            a, b, c = spawn_to_initialize(command, env, first[name])
            init[name].append(a)
            listed[name].append(b)
            ready[name].append(c)
    floor_init = statistics.median(init["floor"])
    results = []
    for name in commands:
        if name == "floor":
            continue
        value = statistics.median(init[name])
        results.append(
            Result(
                "cold start",
                f"{name} -> initialize",
                "s",
                value,
                floor_init,
                "<= 1.25x",
                value / floor_init <= 1.25,
                {"samples": init[name], "floor_samples": init["floor"]},
            )
        )
    main = "python -m task_orchestrator_mcp"
    for label, samples in (("tools/list", listed), ("first tool result (database open)", ready)):
        results.append(
            Result(
                "cold start",
                f"{main} -> {label}",
                "s",
                statistics.median(samples[main]),
                statistics.median(samples["floor"]),
                "",
                None,
                {"samples": samples[main], "floor_samples": samples["floor"]},
            )
        )
    return results
