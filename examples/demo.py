"""A multi-agent demo on the embedded default (SQLite), with the real server spawned over stdio.

A planner creates tasks in two directories; three workers, each with its own server process (as every
agent session has), race for them and complete them. One more worker claims a task and dies without
finishing: its short lease runs out and another worker finishes the task. At the end the demo prints who
did what, read back from the queue itself.

    python examples/demo.py                 # a fresh database in a temporary folder
    python examples/demo.py --database-url sqlite:////tmp/demo.db
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
from mcp import Client, StdioServerParameters

DIRECTORIES = ["/demo/frontend", "/demo/backend"]
PROMPTS = {
    "/demo/frontend": ["Add a dark mode toggle", "Fix the login form's tab order", "Lazy-load the charts"],
    "/demo/backend": [
        "Add an index on orders.created_at",
        "Paginate /api/users",
        "Retry failed webhooks",
        "Rotate the API keys",
    ],
}
LEASE = 2  # seconds: short, so the abandoned task comes back quickly


def server(database_url: str) -> StdioServerParameters:
    """One real server process, as an MCP client would launch it."""
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "task_orchestrator_mcp"],
        env={"TASK_ORCHESTRATOR_DATABASE_URL": database_url, "TASK_ORCHESTRATOR_LOG_LEVEL": "WARNING"},
    )


async def call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    """Call a tool; raise with the server's message if it reports an error."""
    result = await client.call_tool(tool, args)
    if result.is_error:
        raise RuntimeError(" ".join(getattr(c, "text", "") for c in result.content))
    content: dict[str, Any] = result.structured_content or {}
    return content


async def planner(database_url: str) -> None:
    """Create every task; priorities vary so the claim order is visible."""
    async with Client(server(database_url), mode="legacy") as client:
        for directory, prompts in PROMPTS.items():
            for i, prompt in enumerate(prompts):
                priority = ["high", "medium", "low"][i % 3]
                await call(
                    client,
                    "create_task",
                    work_directory=directory,
                    prompt=prompt,
                    priority=priority,
                    tags=["demo"],
                )
    print(f"planner: created {sum(map(len, PROMPTS.values()))} tasks in {len(PROMPTS)} directories")


async def dying_worker(database_url: str) -> None:
    """Claims one task with a short lease, then its agent 'crashes' (server gone, no complete)."""
    async with Client(server(database_url), mode="legacy") as client:
        task = (
            await call(
                client,
                "acquire_task",
                work_directory=DIRECTORIES[1],
                worker_id="worker-crashy",
                lease_seconds=LEASE,
            )
        )["task"]
    if task:
        print(f"worker-crashy: took {task['prompt']!r} and died without finishing")


async def worker(name: str, database_url: str) -> None:
    """Poll both directories until the queue is empty (waiting out any live lease), completing tasks."""
    async with Client(server(database_url), mode="legacy") as client:
        idle = 0
        while idle < 2 * LEASE * 5:
            task = None
            for directory in DIRECTORIES:
                task = (
                    await call(
                        client, "acquire_task", work_directory=directory, worker_id=name, lease_seconds=30
                    )
                )["task"]
                if task:
                    break
            if task is None:
                if not await _anything_left(client):
                    return
                idle += 1
                await anyio.sleep(0.2)
                continue
            idle = 0
            await anyio.sleep(0.05)  # "work"
            await call(
                client,
                "complete_task",
                task_id=task["task_id"],
                worker_id=name,
                result={"summary": f"{name} did it", "attempt": task["attempts"]},
            )


async def _anything_left(client: Client) -> bool:
    for status in ("pending", "in_progress"):
        if (await call(client, "list_tasks", status=status, limit=1))["tasks"]:
            return True
    return False


async def report(database_url: str) -> None:
    """Print who did what, from the queue's own records."""
    async with Client(server(database_url), mode="legacy") as client:
        page = await call(client, "list_tasks", tags=["demo"], limit=200)
        print(f"\n{'directory':<16} {'priority':<8} {'status':<10} {'done by':<10} {'tries':<5} prompt")
        for item in page["tasks"]:
            print(
                f"{item['work_directory']:<16} {item['priority']:<8} {item['status']:<10} "
                f"{item['worker_id'] or '-':<10} {item['attempts']:<5} {item['prompt']}"
            )
        completions = 0
        for item in page["tasks"]:
            full = await call(client, "get_task", task_id=item["task_id"])
            completions += sum(h["to_status"] == "completed" for h in full["history"])
            if item["attempts"] > 1:
                trail = " -> ".join(f"{h['to_status']}({h['worker_id'] or '-'})" for h in full["history"])
                print(f"\nrecovered after a dead worker's lease expired: {item['prompt']!r}\n  {trail}")
        done = sum(t["status"] == "completed" for t in page["tasks"])
        print(f"\n{done}/{len(page['tasks'])} tasks completed; {completions} completions in the history.")


async def main(database_url: str) -> None:
    """Planner, then the crashy worker, then three workers racing."""
    await planner(database_url)
    await dying_worker(database_url)
    async with anyio.create_task_group() as tg:
        for name in ("worker-1", "worker-2", "worker-3"):
            tg.start_soon(worker, name, database_url)
    await report(database_url)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", help="default: a new SQLite file in a temporary folder")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="task-orchestrator-demo-") as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'tasks.db'}"
        print(f"database: {url}")
        anyio.run(main, url)
