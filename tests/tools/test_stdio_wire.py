"""The server's stdio wire, in process on real pipes: stdin's repair (lone surrogate escapes become
U+FFFD, and nothing else changes), and the answer writer's order, backlog and broken pipe."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager

import anyio
import anyio.to_thread
import pytest

from task_orchestrator_mcp.stdio import BACKLOG_BYTES, CALLS, AnswerWriter, repair_line


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


def _read_all(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += os.read(fd, 1 << 16)
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
