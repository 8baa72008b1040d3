"""The server's stdin for the SDK's stdio transport: its lines, with one repair.

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
import re
import sys
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


class _RepairedLines(TextIOWrapper):
    """stdin as UTF-8 text (bytes that are not UTF-8 read as U+FFFD, as the SDK reads them), line by
    line through :func:`repair_line`. Closing it leaves ``sys.stdin`` open."""

    def readline(self, size: int = -1, /) -> str:  # type: ignore[override]  # as typeshed has it
        """The next line, repaired."""
        return repair_line(super().readline(size))

    def close(self) -> None:
        """Let go of the buffer without closing it: it is ``sys.stdin``'s."""
        with contextlib.suppress(ValueError):  # already let go of
            self.detach()


def stdin_lines() -> anyio.AsyncFile[str]:
    """The process's stdin for ``stdio_server(stdin=...)``. Unlike the SDK's own, fd 0 is not pointed
    at /dev/null while serving: this process starts no children, and nothing else in it reads stdin."""
    return anyio.wrap_file(_RepairedLines(sys.stdin.buffer, encoding="utf-8", errors="replace"))
