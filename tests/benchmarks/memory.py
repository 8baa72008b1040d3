"""Part 5, memory: RSS of one real server process along 10,000 mixed calls over stdio."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil
from mcp import Client

from tests.benchmarks.common import Result, Workspace, sqlite_url
from tests.support import server_params, structured


def _peak_rss(proc: Any) -> float:
    # VmHWM is the kernel's own high-water mark of RSS: it catches peaks between our samples.
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float(proc.memory_info().rss) / 2**20


async def run(ws: Workspace, *, calls: int, every: int = 500) -> list[Result]:
    """Peak RSS (MB) after ``calls`` mixed calls, and its growth over the second half of them."""
    url = sqlite_url(ws.migrated_copy("memory"))
    me = psutil.Process()
    before = {child.pid for child in me.children(recursive=True)}
    samples: list[tuple[int, float]] = []
    async with Client(server_params(url), mode="legacy") as client:
        server = next(c for c in me.children(recursive=True) if c.pid not in before)
        samples.append((0, server.memory_info().rss / 2**20))
        directory = "/bench/memory"
        done = 0  # calls made
        step = -1  # which kind of call comes next, in turn (not done % 8: acquire+complete is two calls)
        next_sample = every
        last_id = ""
        while done < calls:
            step = (step + 1) % 8
            if step in (0, 1, 2):
                made = structured(
                    await client.call_tool(
                        "create_task",
                        {"work_directory": directory, "prompt": f"task {done} " + "x" * 400, "tags": ["a"]},
                    )
                )
                last_id = made["task_id"]
            elif step == 3:
                got = structured(await client.call_tool("acquire_task", {"work_directory": directory}))
                if got["task"] is not None:
                    last_id = got["task"]["task_id"]
                    structured(
                        await client.call_tool("complete_task", {"task_id": last_id, "result": {"n": done}})
                    )
                    done += 1
            elif step == 4:
                structured(await client.call_tool("get_task", {"task_id": last_id}))
            elif step == 5:
                structured(await client.call_tool("list_tasks", {"work_directory": directory, "limit": 50}))
            elif step == 6:
                structured(await client.call_tool("list_tasks", {"status": "completed", "limit": 200}))
            else:
                structured(await client.call_tool("list_tasks", {"tags": ["a"], "limit": 20}))
            done += 1
            if done >= next_sample:
                samples.append((done, server.memory_info().rss / 2**20))
                next_sample += every
        samples.append((done, server.memory_info().rss / 2**20))
        peak = _peak_rss(server)
    half = next(rss for n, rss in samples if n >= calls // 2)
    growth = samples[-1][1] - half
    return [
        Result(
            "memory",
            f"peak RSS after {calls:,} mixed calls",
            "MB",
            peak,
            None,
            "<= 120 MB",
            peak <= 120,
            {"samples": samples},
        ),
        Result(
            "memory",
            "RSS growth over the second half",
            "MB",
            growth,
            None,
            "flat (< 5 MB)",
            growth < 5,
            {"rss_at_half": half, "rss_end": samples[-1][1]},
        ),
    ]
