"""The server's stdin and stdout for the SDK's stdio transport (:func:`serve_stdio`): requests read
on the event loop, answers written by a thread of ours, one line repaired, and an end of stdin that
waits until every call has been answered.

The SDK's own transport hands every line read and every answer written (twice: write, then flush) to
a worker thread and back: 0.25-0.3 ms of a no-op call's 1.1 ms (see README, Benchmarks). Here
stdin is read when the event loop sees it has data, and answers are queued to one writer thread.

When stdin ends, the SDK cancels every request still running or still waiting to write its answer:
a client that sends its requests and then closes stdin (``printf ... | task-orchestrator-mcp``, or
any client that half-closes the pipe) got no answer to calls that had been carried out, and a client
slow to read lost every answer that did not fit in the pipe. So the end of stdin is passed on only once
no tool call has run and nothing has been written for a moment (at most :data:`EOF_WAIT_SECONDS`).

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
import queue
import re
import select
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
from loguru import logger
from mcp.types import INVALID_REQUEST, ErrorData, JSONRPCError

if TYPE_CHECKING:
    from mcp.server.lowlevel import Server

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
    the event loop (``with CALLS.one():``); an answer is counted when it is handed to the writer
    thread (on the loop) and again once written (on that thread): each count has one thread that
    changes it, so no lock is needed. Both are waited for on the loop (a signal, see ``cli``, or the
    end of stdin). Once ``stopping``, new calls are refused."""

    def __init__(self) -> None:
        self._running = 0
        # Ever: a call or a write that begins and ends between two looks is still seen.
        self._started = 0
        self._queued = 0
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

    def queued(self) -> None:
        """One answer handed to the writer (the event loop's side)."""
        self._queued += 1

    def written(self) -> None:
        """One answer written, or dropped on a broken wire (the writer thread's side)."""
        self._written += 1

    def _look(self, seen: tuple[int, int] | None) -> tuple[bool, tuple[int, int] | None]:
        """(idle, what to pass next time): idle once nothing ran or was written since the last look."""
        written = self._written
        now = (self._started, written)
        busy = self._running or self._queued != written
        if not busy and now == seen:
            return True, seen
        return False, None if busy else now

    async def until_idle(self, idle: float = _IDLE_SECONDS) -> None:
        """Return once no call has run and nothing has been written for ``idle`` seconds (a request
        read just before has started by then, and a finished call's answer is on its way out). No
        time limit of its own."""
        done, seen = self._look(None)
        while not done:
            await anyio.sleep(idle)
            done, seen = self._look(seen)


CALLS = CallsInFlight()


# How much stdin is read at a time; how many bytes of answers may wait for the writer thread before
# the next answer waits for room (a client that stops reading must not grow the server without end).
_READ_BYTES = 1 << 16
BACKLOG_BYTES = 4 << 20


def max_line_bytes(max_payload_bytes: int) -> int:
    """The longest message a server whose text arguments take up to ``max_payload_bytes`` may need:
    six bytes of JSON per payload byte (the longest escape per byte: ``\\u001f`` for one), and room
    for the rest of the request (a directory, tags, ids, the envelope). Longer ones are skipped
    unread (see :class:`StdinLines`)."""
    return 6 * max_payload_bytes + (1 << 18)


# The limit at the default payload limit (1 MiB).
DEFAULT_MAX_LINE_BYTES = max_line_bytes(1 << 20)
# How much of a skipped message is kept to find its request id in.
_HEAD_BYTES = 1024
# The request id at the start of a message, where the SDKs write it: {"jsonrpc": "2.0", "id": ...
_LEADING_ID = re.compile(
    rb'\A\s*\{\s*(?:"jsonrpc"\s*:\s*"2\.0"\s*,\s*)?"id"\s*:\s*(-?\d{1,20}|"(?:[^"\\]|\\.){0,256}")\s*[,}]'
)


class StdinLines:
    """stdin's lines for the SDK's reader, as UTF-8 text (bytes that are not UTF-8 read as U+FFFD, as
    the SDK reads them), each through :func:`repair_line`; the end comes once the calls in flight are
    answered (at most :data:`EOF_WAIT_SECONDS`).

    A pipe, socket or terminal is read on the event loop when it has data (``wait_readable``): the
    SDK's own reader hands every line to a worker thread and back, which costs each call a thread
    hand-off. What the event loop cannot poll (a regular file or ``/dev/null`` given as stdin) is
    read on a worker thread, as the SDK does. A line ends at ``\\n``; a ``\\r`` before it is JSON
    whitespace.

    A line longer than ``max_line_bytes`` (more than any request the tools accept can take) is not
    kept: its bytes are dropped as they come, so a client that sends one, or never sends a newline,
    cannot grow the server's memory without end; once it ends, the client gets a JSON-RPC error
    (with the request's id when the line begins with it, as the SDKs write requests) and the next
    line is read as usual.
    """

    def __init__(self, fd: int, answers: AnswerWriter, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self._fd = fd
        self._answers = answers
        self._max_line = max_line_bytes
        self._buffer = bytearray()
        self._scanned = 0  # no "\n" in the buffer before this
        self._skipping: bytes | None = None  # the head of a line over the limit, while its rest goes
        self._ended = False
        self._pollable = True  # until the event loop says otherwise

    def __aiter__(self) -> StdinLines:
        return self

    async def __anext__(self) -> str:
        while True:
            # The client can no longer read answers: stop taking requests (see cli, BrokenPipeError).
            self._answers.raise_if_broken()
            end = self._buffer.find(b"\n", self._scanned)
            if end >= 0:
                if self._skipping is None and end <= self._max_line:  # its length, without the "\n"
                    return self._take(end + 1)
                await self._refuse_long_line(end + 1)
                continue
            self._scanned = len(self._buffer)
            if len(self._buffer) > self._max_line or (self._skipping is not None and self._buffer):
                self._skip(len(self._buffer))  # no "\n" yet: the line is too long already
            if self._ended:
                if self._skipping is not None:
                    await self._refuse_long_line(0)
                    continue
                if self._buffer:  # a last line without its "\n"
                    return self._take(len(self._buffer))
                await _wait_for_calls()
                raise StopAsyncIteration
            chunk = await self._read()
            if chunk is None:
                continue
            if chunk:
                self._buffer += chunk
            else:
                self._ended = True

    def _take(self, size: int) -> str:
        """The buffer's first ``size`` bytes, taken out, as a repaired line."""
        line = bytes(self._buffer[:size])
        del self._buffer[:size]
        self._scanned = 0
        return repair_line(line.decode("utf-8", "replace"))

    def _skip(self, size: int) -> None:
        """Drop the buffer's first ``size`` bytes, part of a line over the limit (its head kept)."""
        if self._skipping is None:
            self._skipping = bytes(self._buffer[:_HEAD_BYTES])
        del self._buffer[:size]
        self._scanned = 0

    async def _refuse_long_line(self, size: int) -> None:
        """Drop the rest (``size`` bytes) of a line over the limit and answer it with an error."""
        self._skip(size)
        head, self._skipping = self._skipping or b"", None
        found = _LEADING_ID.match(head)
        request_id = None if found is None else json.loads(found.group(1))
        logger.warning(
            "a message of over {} bytes (request id {!r}) was not read: larger than any request takes",
            self._max_line,
            request_id,
        )
        message = (
            f"Message too large: over {self._max_line} bytes, more than any request to this server "
            "can need. It was not read, and nothing was done."
        )
        # The SDK's own error message, written as its transport writes one.
        error = ErrorData(code=INVALID_REQUEST, message=message)
        answer = JSONRPCError(jsonrpc="2.0", id=request_id, error=error)
        await self._answers.write(answer.model_dump_json(by_alias=True, exclude_unset=True) + "\n")

    async def _read(self) -> bytes | None:
        """What stdin has now (b"" at its end), or None when it turned out to have nothing yet."""
        if self._pollable:
            try:
                await anyio.wait_readable(self._fd)
            except (OSError, NotImplementedError, ValueError):  # e.g. EPERM: epoll takes no regular file
                self._pollable = False
            else:
                try:
                    # Blocking descriptor, but it has data: a pipe or socket returns what is there.
                    return os.read(self._fd, _READ_BYTES)
                except BlockingIOError:  # a descriptor inherited non-blocking, and the data went
                    return None
        return await anyio.to_thread.run_sync(os.read, self._fd, _READ_BYTES, abandon_on_cancel=True)


async def _wait_for_calls() -> None:
    with anyio.move_on_after(EOF_WAIT_SECONDS) as waiting:
        await CALLS.until_idle()
    if waiting.cancelled_caught:
        logger.warning("stdin closed; calls or answers pending after {} s are cancelled", EOF_WAIT_SECONDS)


class AnswerWriter:
    """The wire to the client, for the SDK's writer: each answer is handed to one thread of ours that
    writes it, in order, while the event loop goes on. The SDK's own writer waits for a worker thread
    to write and again to flush every answer: two thread hand-offs on each call's path.

    At most :data:`BACKLOG_BYTES` wait (past that, the next answer waits for room). Once a write
    fails (the client has gone), the rest are dropped and the next write, or the next line read,
    raises that error. Each answer is counted in :data:`CALLS` when handed over and when written."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._room = threading.Condition()
        self._waiting = 0  # bytes handed over and not yet written; changed under _room
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="stdout-writer", daemon=True)
        self._thread.start()

    async def write(self, text: str) -> int:
        """Hand ``text`` to the writer thread; wait only while the backlog is full."""
        self.raise_if_broken()
        data = text.encode("utf-8")
        CALLS.queued()
        with self._room:
            self._waiting += len(data)
            full = self._waiting > BACKLOG_BYTES
        self._queue.put(data)
        if full:
            await anyio.to_thread.run_sync(self._wait_for_room, abandon_on_cancel=True)
        return len(text)

    async def flush(self) -> None:
        """Nothing to do: the writer thread writes each answer as soon as it has it."""

    def raise_if_broken(self) -> None:
        """Raise the error a write met, if one did."""
        if self._error is not None:
            raise self._error

    def close(self, timeout: float) -> bool:
        """Let the thread write what it has, for at most ``timeout`` seconds; True if it did. The
        descriptor stays open: the thread may still be blocked on it (a client that stopped reading)."""
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _wait_for_room(self) -> None:
        with self._room:
            self._room.wait_for(lambda: self._waiting <= BACKLOG_BYTES or self._error is not None)

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            try:
                if self._error is None:
                    self._write_all(data)
            except OSError as exc:  # BrokenPipeError above all: the client has gone
                self._error = exc
            finally:
                with self._room:
                    self._waiting -= len(data)
                    self._room.notify_all()
                CALLS.written()

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except BlockingIOError:  # a descriptor inherited non-blocking: wait until it takes more
                select.select([], [self._fd], [])


# How long the end of serving waits for the writer thread to write what it still has.
_CLOSE_WAIT_SECONDS = 5.0


async def serve_stdio(server: Server[Any], max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
    """Serve ``server`` (a low-level SDK server) on stdin and stdout through the SDK's stdio transport
    with this module's reader and writer (a message over ``max_line_bytes`` is refused unread, see
    :class:`StdinLines`). As the SDK does, the client's pipe moves to a descriptor of its own and
    fd 1 points at stderr while serving, so that a stray print (ours or a library's) lands in the log
    instead of corrupting the protocol. Unlike the SDK, fd 0 is not pointed at /dev/null: this
    process starts no children, and nothing else in it reads stdin."""
    from mcp.server.stdio import stdio_server

    if sys.stdout is not None:
        sys.stdout.flush()
    # Never closed, as the SDK never closes its own: the writer thread may still be blocked on it.
    wire = os.dup(1)
    os.dup2(2, 1)
    answers = AnswerWriter(wire)
    try:
        lines = StdinLines(0, answers, max_line_bytes)
        # The SDK types these as anyio's AsyncFile; it uses only iteration, write and flush.
        async with stdio_server(stdin=lines, stdout=answers) as (read_stream, write_stream):  # type: ignore[arg-type]
            await server.run(read_stream, write_stream, server.create_initialization_options())
    finally:
        if not answers.close(_CLOSE_WAIT_SECONDS):
            logger.warning("answers not taken by the client within {} s are dropped", _CLOSE_WAIT_SECONDS)
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sys.stdout.flush()  # a stray print still buffered goes to stderr, not to the wire
        os.dup2(wire, 1)
