"""A minimal JSON-RPC client over a spawned server's stdio: no SDK, no output-schema validation.

Used to tell the server's own per-call cost apart from the SDK client's (which re-validates every
structured result against the tool's output schema with ``jsonschema``).
"""

from __future__ import annotations

import json
import subprocess
from types import TracebackType
from typing import Any

from tests.benchmarks.startup import INITIALIZE


class RawStdio:
    """Spawn ``command``, initialize, then ``call`` tools one at a time."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self._proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env
        )
        self._next_id = 1
        try:
            self._send_raw(INITIALIZE)
            self._read(1)
            self._send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        except BaseException:
            self.close()
            raise

    def _send_raw(self, data: bytes) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(data)
        self._proc.stdin.flush()

    def _send(self, message: dict[str, Any]) -> None:
        self._send_raw(json.dumps(message).encode() + b"\n")

    def _read(self, request_id: int) -> dict[str, Any]:
        assert self._proc.stdout is not None
        while True:
            line = self._proc.stdout.readline()
            if not line:
                raise RuntimeError("server closed stdout")
            message: dict[str, Any] = json.loads(line)
            if message.get("id") == request_id:
                return message

    def call(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """Call a tool; its structured content (raises on an error result)."""
        self._next_id += 1
        self._send(
            {
                "jsonrpc": "2.0",
                "id": self._next_id,
                "method": "tools/call",
                "params": {"name": name, "arguments": arguments},
            }
        )
        result: dict[str, Any] = self._read(self._next_id)["result"]
        if result.get("isError"):
            raise RuntimeError(f"{name}: {result}")
        structured: dict[str, Any] = result["structuredContent"]
        return structured

    def close(self) -> None:
        """Close stdin, wait for the server to exit (killed after 30 s), then close its stdout."""
        assert self._proc.stdin is not None
        assert self._proc.stdout is not None
        try:
            self._proc.stdin.close()
            self._proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        finally:
            self._proc.stdout.close()

    def __enter__(self) -> RawStdio:
        return self

    def __exit__(
        self, _t: type[BaseException] | None, _e: BaseException | None, _tb: TracebackType | None
    ) -> None:
        self.close()
