"""The server's stdin and stdout for the SDK's stdio transport: stdin's lines, with one repair, and
an end that waits until every call has been answered.

When stdin ends, the SDK cancels every request still running or still waiting to write its answer:
a client that sends its requests and then closes stdin (``printf ... | task-orchestrator-mcp``, or
any client that half-closes the pipe) got no answer to calls that had been carried out, and a client
slow to read lost every answer that did not fit in the pipe. So the end of stdin is passed on only once
no tool call has run and nothing has been written for a moment (at most :data:`EOF_WAIT_SECONDS`);
the server's own stdout writer is what tells the second.

A JSON string may escape a lone UTF-16 surrogate (``"\\ud800"``): valid JSON by its grammar, and what
JavaScript's ``JSON.stringify`` writes for a string cut in the middle of an emoji. The SDK parses each
line with pydantic, which refuses such an escape; the SDK then drops the request without an answer, and
the client waits for its own timeout. Such a line is decoded with Python's ``json`` instead, each lone
surrogate replaced by U+FFFD (the replacement character: what the transport already does with bytes
that are not UTF-8, and what Node does when it writes such a string out as UTF-8), and passed on.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from io import TextIOWrapper
from typing import Any

import anyio
from loguru import logger

# A surrogate escape that is not half of a pair (a high one not followed by a low one, or a low one
# not preceded by a high one): a cheap test that almost every line fails, emoji sent as escaped pairs
# included. It may match text that only looks like an escape (an escaped backslash before "ud800"):
# the full decode below then finds nothing to replace.
_HIGH = r"\\u[dD][89abAB][0-9a-fA-F]{2}"
_LOW = r"\\u[dD][c-fC-F][0-9a-fA-F]{2}"
_SURROGATE_ESCAPE = re.compile(f"{_HIGH}(?!{_LOW})|(?<!{_HIGH}){_LOW}")
# Once decoded, a paired escape is one code point: a surrogate left in a string is a lone one.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def repair_line(line: str) -> str:
    """``line`` with every lone surrogate in its strings replaced by U+FFFD; the line itself when it
    has none (or is not JSON, which the SDK then reports as before)."""
    if _SURROGATE_ESCAPE.search(line) is None:
        return line
    replaced = 0

    def fix(value: Any) -> Any:
        nonlocal replaced
        if isinstance(value, str):
            value, count = _LONE_SURROGATE.subn("\ufffd", value)
            replaced += count
            return value
        if isinstance(value, list):
            return [fix(item) for item in value]
        if isinstance(value, dict):
            return {fix(key): fix(item) for key, item in value.items()}
        return value

    try:
        fixed = fix(json.loads(line))
    except (ValueError, RecursionError):
        return line
    if not replaced:
        return line
    logger.warning("a message held {} lone UTF-16 surrogate(s): each replaced by U+FFFD", replaced)
    return json.dumps(fixed, ensure_ascii=False) + "\n"


# How long the end of stdin waits for tool calls to finish; how long none must have run before.
EOF_WAIT_SECONDS = 30.0
_IDLE_SECONDS = 0.05


class CallsInFlight:
    """The tool calls this process is running, and the answers it is writing. Calls are counted on
    the event loop (``with CALLS.one():``), writes on the writer's thread; both are waited for on the
    loop (a signal, see ``cli``) or from stdin's reader thread (its end). Once ``stopping``, new calls
    are refused."""

    def __init__(self) -> None:
        self._running = 0
        self._writing = 0
        # Ever: a call or a write that begins and ends between two looks is still seen.
        self._started = 0
        self._written = 0
        self.stopping = False

    @contextlib.contextmanager
    def one(self) -> Iterator[None]:
        """Count one call while the block runs."""
        self._running += 1
        self._started += 1
        try:
            yield
        finally:
            self._running -= 1

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Count one write to the client (one thread writes at a time)."""
        self._writing += 1
        try:
            yield
        finally:
            self._writing -= 1
            self._written += 1

    def _look(self, seen: tuple[int, int] | None) -> tuple[bool, tuple[int, int] | None]:
        """(idle, what to pass next time): idle once nothing ran or was written since the last look."""
        now = (self._started, self._written)
        busy = self._running or self._writing
        if not busy and now == seen:
            return True, seen
        return False, None if busy else now

    def wait_until_idle(self, timeout: float, idle: float = _IDLE_SECONDS) -> bool:
        """True once no call has run and nothing has been written for ``idle`` seconds (a request
        read just before has started by then, and a finished call's answer is on its way out); False
        after ``timeout`` seconds. Blocks."""
        deadline = time.monotonic() + timeout
        done, seen = self._look(None)
        while not done and time.monotonic() < deadline:
            time.sleep(idle)
            done, seen = self._look(seen)
        return done

    async def until_idle(self, idle: float = _IDLE_SECONDS) -> None:
        """:meth:`wait_until_idle` on the event loop, with no time limit of its own."""
        done, seen = self._look(None)
        while not done:
            await anyio.sleep(idle)
            done, seen = self._look(seen)


CALLS = CallsInFlight()


def _wait_for_calls() -> None:
    if not CALLS.wait_until_idle(EOF_WAIT_SECONDS):
        logger.warning("stdin closed; calls or answers pending after {} s are cancelled", EOF_WAIT_SECONDS)


class _RepairedLines(TextIOWrapper):
    """stdin as UTF-8 text (bytes that are not UTF-8 read as U+FFFD, as the SDK reads them), line by
    line through :func:`repair_line`; its end comes once the calls in flight are done. Closing it
    leaves ``sys.stdin`` open."""

    def readline(self, size: int = -1, /) -> str:  # type: ignore[override]  # as typeshed has it
        """The next line, repaired; at the end, "" once the calls in flight are done."""
        line = super().readline(size)
        if not line:
            _wait_for_calls()
            return line
        return repair_line(line)

    def close(self) -> None:
        """Let go of the buffer without closing it: it is ``sys.stdin``'s."""
        with contextlib.suppress(ValueError):  # already let go of
            self.detach()


class _Answers(TextIOWrapper):
    """The wire to the client as UTF-8 text; each write and flush counted in :data:`CALLS`. Closing
    it lets go of the descriptor without closing it, and without raising if the client has gone."""

    def write(self, text: str, /) -> int:
        """Write ``text``, counted."""
        with CALLS.writing():
            return super().write(text)

    def flush(self) -> None:
        """Flush, counted: with a client slow to read, this is where the wait is."""
        with CALLS.writing():
            super().flush()

    def close(self) -> None:
        """Let go of the descriptor (a broken pipe at the last flush is no news any more)."""
        with contextlib.suppress(ValueError, OSError):
            self.detach()


@contextlib.contextmanager
def stdout_wire() -> Iterator[anyio.AsyncFile[str]]:
    """The wire to the client for ``stdio_server(stdout=...)``, taken as the SDK takes it: the
    client's pipe moves to a descriptor of its own, and fd 1 points at stderr while serving, so that
    a stray print (ours or a library's) lands in the log instead of corrupting the protocol."""
    if sys.stdout is not None:
        sys.stdout.flush()
    # Never closed, as the SDK never closes its own: a writer thread may still be blocked on it.
    wire = os.dup(1)
    os.dup2(2, 1)
    answers = _Answers(os.fdopen(wire, "wb", closefd=False), encoding="utf-8")
    try:
        yield anyio.wrap_file(answers)
    finally:
        answers.close()
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sys.stdout.flush()  # a stray print still buffered goes to stderr, not to the wire
        os.dup2(wire, 1)


def stdin_lines() -> anyio.AsyncFile[str]:
    """The process's stdin for ``stdio_server(stdin=...)``. Unlike the SDK's own, fd 0 is not pointed
    at /dev/null while serving: this process starts no children, and nothing else in it reads stdin."""
    return anyio.wrap_file(_RepairedLines(sys.stdin.buffer, encoding="utf-8", errors="replace"))
