"""Part 1, cold start: spawn to the ``initialize`` answer, real server against the bare floor server."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tests.benchmarks.common import Result, Workspace, sqlite_url
from tests.support import server_env

FLOOR_SCRIPT = Path(__file__).with_name("floor_server.py")
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


def spawn_to_initialize(command: list[str], env: dict[str, str]) -> float:
    """Seconds from spawning ``command`` to reading its answer to ``initialize`` on stdout."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(INITIALIZE)
    proc.stdin.flush()
    line = proc.stdout.readline()
    elapsed = time.perf_counter() - started
    proc.stdin.close()
    proc.wait(timeout=30)
    if b'"result"' not in line:
        raise RuntimeError(f"{command}: no initialize result: {line[:300]!r}")
    return elapsed


def run(ws: Workspace, *, repeats: int) -> list[Result]:
    """Median spawn-to-initialize of the real server (module and console script) and of the floor."""
    db = ws.migrated_copy("coldstart")
    env = server_env(sqlite_url(db))
    real = [sys.executable, "-m", "task_orchestrator_mcp"]
    script = shutil.which("task-orchestrator-mcp", path=str(Path(sys.executable).parent))
    floor = [sys.executable, str(FLOOR_SCRIPT)]
    # One warm-up each (page cache, .pyc), then interleaved so noise hits all of them alike.
    for command in (floor, real):
        spawn_to_initialize(command, env)
    samples: dict[str, list[float]] = {"floor": [], "module": [], "script": []}
    for _ in range(repeats):
        samples["floor"].append(spawn_to_initialize(floor, env))
        samples["module"].append(spawn_to_initialize(real, env))
        if script:
            samples["script"].append(spawn_to_initialize([script], env))
    floor_median = statistics.median(samples["floor"])
    results = []
    for key, label in (("module", "python -m task_orchestrator_mcp"), ("script", "task-orchestrator-mcp")):
        if not samples[key]:
            continue
        value = statistics.median(samples[key])
        results.append(
            Result(
                "cold start",
                label,
                "s",
                value,
                floor_median,
                "<= 1.25x",
                value / floor_median <= 1.25,
                {"samples": samples[key], "floor_samples": samples["floor"]},
            )
        )
    return results
