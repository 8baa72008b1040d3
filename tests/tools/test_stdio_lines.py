"""The server's stdin repair: lone surrogate escapes become U+FFFD, and nothing else changes."""

from __future__ import annotations

import json

import pytest

from task_orchestrator_mcp.stdio import repair_line


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
