"""One worker of the crash test (``python -m tests.proofs.crash_worker``), run as its own process.

It spawns the real server over stdio with the SDK client and loops: acquire a task (its preferred
directory first, then the others), complete it at once, and append every completion the server
acknowledged to ``--acks`` (one JSON line). The chaos loop of ``test_crash.py`` kill -9's its server at
random; the worker then starts a new server and retries the completion it had in flight, as an agent
would. It stops when no task is pending or in progress any more, or at ``--deadline`` (exit code 3).

Anything unexpected (an isError the chaos cannot explain) goes to ``--errors``; the test fails on it.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import anyio
import psutil
from mcp import Client

from tests.support import server_params

# What a completion retried after a crash may legitimately hear: the first attempt did commit but its
# answer was lost ("already completed"), or the lease ran out and the task moved on (not the holder).
_EXPECTED_REFUSALS = ("already completed", "held by worker", "it is pending")
# Orphaned tasks come back only when their lease ends: poll for them at this pace.
_IDLE_POLL_SECONDS = 0.25


@dataclass
class Stats:
    """What one worker saw; printed as one JSON line on stdout at the end."""

    worker: str
    servers_started: int = 0
    connection_losses: int = 0
    acks: int = 0
    refused_retries: int = 0
    lost_claims: int = 0
    unexpected: list[str] = field(default_factory=list)


class Worker:
    """The acquire/complete loop of one worker across any number of server restarts."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.url: str = args.url
        self.worker_id: str = args.worker_id
        directories: list[str] = args.directories.split(",")
        start = args.index % len(directories)
        # Prefer one directory, then the others: several workers contend for every directory.
        self.directories = directories[start:] + directories[:start]
        self.lease: int = args.lease
        self.deadline: float = time.monotonic() + args.deadline
        self.acks: TextIO = Path(args.acks).open("a", encoding="utf-8")  # noqa: SIM115 - lives as long as we do
        self.errors: TextIO = Path(args.errors).open("a", encoding="utf-8")  # noqa: SIM115
        self.ready = Path(args.ready)
        self.stats = Stats(worker=self.worker_id)
        # The completion in flight when the server died: (task_id, result), retried on the next server.
        self.in_flight: tuple[str, dict[str, Any]] | None = None
        self.done = False

    async def run(self) -> int:
        """Serve until the queue is drained; restart the server whenever it dies. 3: deadline passed."""
        # A hung server would leave a call waiting forever: the deadline bounds the whole run.
        with anyio.move_on_after(self.deadline - time.monotonic()):
            while not self.done:
                try:
                    async with Client(
                        server_params(self.url, TASK_ORCHESTRATOR_LOG_LEVEL="ERROR"), mode="legacy"
                    ) as client:
                        self.stats.servers_started += 1
                        self._announce_server()
                        await self._serve(client)
                except Exception as exc:  # the chaos loop killed our server: a transport error says so
                    self.stats.connection_losses += 1
                    print(f"{self.worker_id}: server lost: {exc!r}", file=sys.stderr, flush=True)
        return 0 if self.done else 3

    def _announce_server(self) -> None:
        """Tell the chaos loop the pid of our server, now that it is serving (past initialize)."""
        for child in psutil.Process().children():
            try:
                if child.status() != psutil.STATUS_ZOMBIE and "task_orchestrator_mcp" in child.cmdline():
                    staged = self.ready.with_suffix(".tmp")
                    staged.write_text(str(child.pid))
                    staged.replace(self.ready)  # atomic: the chaos loop never reads half a pid
            except psutil.NoSuchProcess:
                continue

    async def _serve(self, client: Client) -> None:
        if self.in_flight is not None:
            await self._complete(client, *self.in_flight)
        while True:
            task = await self._acquire(client)
            if task is None:
                if await self._drained(client):
                    self.done = True
                    return
                await anyio.sleep(_IDLE_POLL_SECONDS)
                continue
            result = {"by": self.worker_id, "nonce": secrets.token_hex(6), "attempt": task["attempts"]}
            self.in_flight = (task["task_id"], result)
            await self._complete(client, task["task_id"], result)

    async def _acquire(self, client: Client) -> dict[str, Any] | None:
        for directory in self.directories:
            r = await client.call_tool(
                "acquire_task",
                {"work_directory": directory, "worker_id": self.worker_id, "lease_seconds": self.lease},
            )
            if r.is_error:
                self._unexpected("acquire_task", r)
                continue
            task: dict[str, Any] | None = (r.structured_content or {}).get("task")
            if task is not None:
                return task
        return None

    async def _complete(self, client: Client, task_id: str, result: dict[str, Any]) -> None:
        r = await client.call_tool(
            "complete_task", {"task_id": task_id, "result": result, "worker_id": self.worker_id}
        )
        # From here the outcome is known: nothing is in flight any more.
        self.in_flight = None
        if not r.is_error:
            self.acks.write(
                json.dumps({"task_id": task_id, "worker": self.worker_id, "result": result}) + "\n"
            )
            self.acks.flush()
            self.stats.acks += 1
            return
        text = _text(r)
        if any(reason in text for reason in _EXPECTED_REFUSALS):
            self.stats.refused_retries += 1
            if "already completed" not in text:
                self.stats.lost_claims += 1
            return
        self._unexpected("complete_task", r)

    async def _drained(self, client: Client) -> bool:
        for status in ("pending", "in_progress"):
            r = await client.call_tool("list_tasks", {"status": status, "limit": 1})
            if r.is_error:
                self._unexpected("list_tasks", r)
                return False
            if (r.structured_content or {}).get("tasks"):
                return False
        return True

    def _unexpected(self, tool: str, result: Any) -> None:
        line = f"{self.worker_id} {tool}: {_text(result)}"
        self.stats.unexpected.append(line)
        self.errors.write(line + "\n")
        self.errors.flush()


def _text(result: Any) -> str:
    return " ".join(getattr(block, "text", "") for block in result.content)


def main() -> int:
    """Parse arguments, run the worker, print its stats as one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--directories", required=True, help="comma-separated absolute paths")
    parser.add_argument("--lease", type=int, required=True)
    parser.add_argument("--deadline", type=float, required=True, help="seconds before giving up")
    parser.add_argument("--acks", required=True)
    parser.add_argument("--errors", required=True)
    parser.add_argument("--ready", required=True, help="file that gets the pid of our serving server")
    worker = Worker(parser.parse_args())
    code = anyio.run(worker.run)
    print(json.dumps(worker.stats.__dict__), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
