"""The server's stdio wire, in process on real pipes: stdin's repair (lone surrogate escapes become
U+FFFD, and nothing else changes) and its limit on a line, and the answer writer's order, backlog and
broken pipe."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import anyio.to_thread
import pytest

from task_orchestrator_mcp.stdio import (
    BACKLOG_BYTES,
    CALLS,
    DEFAULT_MAX_LINE_BYTES,
    AnswerWriter,
    StdinLines,
    max_line_bytes,
    repair_line,
)


@pytest.mark.parametrize(
    "line",
    [
        '{"jsonrpc": "2.0", "id": 1, "method": "ping"}\n',
        '{"text": "emoji as a pair \\ud83d\\ude00, and as itself 😀"}\n',
        '{"text": "an escaped backslash, then text: \\\\ud800"}\n',
        '{"not json": \\ud800\n',  # left for the SDK to report
        "",
    ],
)
def test_lines_without_a_lone_surrogate_pass_unchanged(line: str) -> None:
    assert repair_line(line) is line


def test_each_lone_surrogate_becomes_the_replacement_character() -> None:
    line = '{"id": 7, "a": ["x\\ud800y", {"\\udfff": "\\ud83d"}], "pair": "\\ud83d\\ude00", "n": 1.5}\n'
    repaired = repair_line(line)
    assert repaired.endswith("\n")
    assert json.loads(repaired) == {
        "id": 7,
        "a": ["x\ufffdy", {"\ufffd": "\ufffd"}],
        "pair": "\U0001f600",
        "n": 1.5,
    }
    repaired.encode("utf-8")  # valid UTF-8 now, as the SDK's parser needs


@contextmanager
def _pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    try:
        yield read_end, write_end
    finally:
        for fd in (read_end, write_end):
            with contextlib.suppress(OSError):
                os.close(fd)


def _read_all(fd: int, size: int | None = None) -> bytes:
    """What ``fd`` gives until ``size`` bytes have come (with no size, or sooner: until its end)."""
    data = b""
    while size is None or len(data) < size:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.anyio
async def test_answers_are_written_whole_and_in_order_and_a_full_backlog_waits() -> None:
    """Nobody reads the pipe: answers queue until BACKLOG_BYTES, then the next write waits (a client
    that stops reading must not grow the server without end). Once read, every byte comes out in
    order, and each answer was counted as written."""
    answer = "x" * 99_999 + "\n"  # 100 KB: more than the pipe holds
    with _pipe() as (read_end, write_end):
        writer = AnswerWriter(write_end)
        before = CALLS._written
        handed = 0
        with anyio.move_on_after(2):
            while True:
                handed += 1  # handed over even if the wait for room that may follow is cut short
                await writer.write(f"{handed - 1:08d}" + answer[8:])
        # The write that took the backlog past its limit is the one that waited.
        assert BACKLOG_BYTES < handed * len(answer) <= BACKLOG_BYTES + len(answer)
        data = await anyio.to_thread.run_sync(_read_all, read_end, handed * len(answer))
        assert writer.close(10)
    lines = data.decode().splitlines()
    assert [int(line[:8]) for line in lines] == list(range(handed))
    assert CALLS._written - before == handed


@pytest.mark.anyio
async def test_after_the_client_goes_answers_are_dropped_and_the_next_write_raises() -> None:
    """The client closed its end: the write that meets the broken pipe records it, and from then on
    a write or a line read raises it (the server stops taking requests; see cli). Nothing waits."""
    with _pipe() as (read_end, write_end):
        os.close(read_end)
        writer = AnswerWriter(write_end)
        await writer.write("lost\n")
        assert writer.close(10)
        with pytest.raises(BrokenPipeError):
            writer.raise_if_broken()
        with pytest.raises(BrokenPipeError):
            await writer.write("also lost\n")
    with anyio.fail_after(5):
        await CALLS.until_idle(idle=0.01)  # no write is left counted as in flight


def _feed(fd: int, pieces: list[bytes]) -> None:
    """Write ``pieces`` to ``fd`` one by one, a moment apart (each its own read), then close it."""
    try:
        for piece in pieces:
            view = memoryview(piece)
            while view:
                view = view[os.write(fd, view) :]
            time.sleep(0.01)
    finally:
        os.close(fd)


@pytest.mark.anyio
async def test_a_line_over_the_limit_is_dropped_as_it_comes_and_answered_with_an_error() -> None:
    """Lines up to the limit pass whole; a longer one is never held (the buffer stays within the
    limit and one read), and once it ends the client gets an Invalid Request error with the id it
    starts with (null when it does not start with one); the lines after it are read as usual."""
    limit = 200
    exact = b'{"jsonrpc":"2.0","id":1,"pad":"' + b"a" * (limit - 33) + b'"}\n'  # the limit, and "\n"
    one_over = exact.replace(b'"id":1', b'"id":6').replace(b'"pad":"', b'"pad":"e')
    assert (len(exact), len(one_over)) == (limit + 1, limit + 2)
    with_id = b'{"jsonrpc": "2.0", "id": "big-1", "method": "tools/call", "x": "' + b"b" * 1_000_000 + b'"}\n'
    after = b'{"jsonrpc":"2.0","id":3,"method":"ping"}\n'
    without_id = b'{"method": "tools/call", "id": 4, "x": "' + b"c" * 5000 + b'"}\n'
    unended = b'{"id": 5, "x": "' + b"d" * 300  # the input ends inside it
    pieces = [
        exact + one_over,
        with_id[:70_000],
        with_id[70_000:],
        after + without_id[:100],
        without_id[100:],
        unended,
    ]
    with _pipe() as (stdin_read, stdin_write), _pipe() as (answers_read, answers_write):
        writer = AnswerWriter(answers_write)
        lines = StdinLines(stdin_read, writer, max_line_bytes=limit)
        buffered: list[int] = []
        original_read = lines._read

        async def read() -> bytes | None:
            buffered.append(len(lines._buffer))
            return await original_read()

        lines._read = read  # type: ignore[method-assign]
        feeding = threading.Thread(target=_feed, args=(stdin_write, pieces))
        feeding.start()
        with anyio.fail_after(30):
            got = [line async for line in lines]
        feeding.join()
        assert writer.close(10)
        os.close(answers_write)
        answers = [json.loads(line) for line in _read_all(answers_read).splitlines()]
    assert got == [exact.decode(), after.decode()]
    assert max(buffered) <= limit + (1 << 16)
    assert [answer["id"] for answer in answers] == [6, "big-1", None, 5]
    for answer in answers:
        assert answer["jsonrpc"] == "2.0"
        assert answer["error"]["code"] == -32600
        assert "over 200 bytes" in answer["error"]["message"]
        assert "nothing was done" in answer["error"]["message"]


def test_the_line_limit_leaves_room_for_the_largest_request_the_tools_take() -> None:
    """A prompt at the payload limit, every byte a control character (six bytes of JSON each), in a
    create_task call with the longest directory and the most tags: the line still fits."""
    payload = 1 << 20
    arguments = {
        "work_directory": "/" + "é" * 1023,
        "prompt": "\x01" * payload,
        "tags": ["😀" * 64] * 32,
        "priority": "medium",
        "max_attempts": 3,
    }
    line = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 2**53,
            "method": "tools/call",
            "params": {"name": "create_task", "arguments": arguments},
        }
    )
    assert len(line.encode()) <= max_line_bytes(payload) == DEFAULT_MAX_LINE_BYTES
