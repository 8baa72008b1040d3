"""The real server process over stdio: the SDK client end to end, a clean stdout, and the CLI's errors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from task_orchestrator_mcp.settings import Settings
from tests.support import (
    fresh_postgres_database,
    postgres_admin_url,
    postgres_read_only,
    run_server_once,
    server_env,
    server_params,
    structured,
    wait_for_the_write_gate,
)

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}


def _rpc(id_: int, method: str, params: dict[str, Any] | None = None) -> str:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": id_, "method": method}
    if params is not None:
        message["params"] = params
    return json.dumps(message)


def _session(*calls: tuple[str, dict[str, Any]]) -> list[str]:
    """The handshake, then each tool call (ids from 2), as lines without their newline."""
    lines = [json.dumps(INIT), json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"})]
    lines += [
        _rpc(n, "tools/call", {"name": name, "arguments": args}) for n, (name, args) in enumerate(calls, 2)
    ]
    return lines


def _answers(stdout: bytes | str) -> dict[int, Any]:
    """Every answer on stdout, by request id (each line must be one JSON-RPC message)."""
    return {message["id"]: message for message in map(json.loads, stdout.splitlines())}


@pytest.mark.anyio
async def test_worker_loop_over_stdio(database_url: str) -> None:
    async with Client(server_params(database_url), mode="legacy") as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert "acquire_task" in tools
        created = structured(
            await client.call_tool(
                "create_task", {"work_directory": "/repo", "prompt": "ship it", "priority": "high"}
            )
        )
        acquired = structured(await client.call_tool("acquire_task", {"work_directory": "/repo"}))["task"]
        assert acquired["task_id"] == created["task_id"]
        # The default worker id is this server process's own.
        assert acquired["worker_id"]
        done = structured(
            await client.call_tool("complete_task", {"task_id": created["task_id"], "result": {"ok": True}})
        )
        assert done["status"] == "completed"
    # A second, separate server process sees the same durable state.
    async with Client(server_params(database_url), mode="legacy") as client:
        again = structured(await client.call_tool("get_task", {"task_id": created["task_id"]}))
        assert again["result"] == {"ok": True}
        assert [h["to_status"] for h in again["history"]] == ["pending", "in_progress", "completed"]


@pytest.mark.parametrize("level", ["TRACE", "DEBUG", "INFO"])
def test_stdout_carries_only_json_rpc_at_every_log_level(tmp_path: Path, level: str) -> None:
    # A fresh database, so the migration (and its Alembic logging) runs in this very process.
    url = f"sqlite:///{tmp_path / 'new' / 'tasks.db'}"
    calls = [
        json.dumps(INIT),
        json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        _rpc(2, "tools/list"),
        _rpc(3, "tools/call", {"name": "create_task", "arguments": {"work_directory": "/x", "prompt": "p"}}),
        _rpc(4, "tools/call", {"name": "create_task", "arguments": {"work_directory": "x", "prompt": "p"}}),
        _rpc(5, "tools/call", {"name": "acquire_task", "arguments": {"work_directory": "/x"}}),
    ]
    # stderr to a file: a full stderr pipe nobody reads would block the server.
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "task_orchestrator_mcp"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=server_env(url, TASK_ORCHESTRATOR_LOG_LEVEL=level),
        )
    assert proc.stdin is not None
    assert proc.stdout is not None
    watchdog = threading.Timer(60, proc.kill)  # a hung server fails the test instead of hanging it
    watchdog.start()
    try:
        # Requests run concurrently (the SDK guarantees no order), so the acquire is sent only once the
        # creates are answered.
        proc.stdin.write("\n".join(calls[:-1]) + "\n")
        proc.stdin.flush()
        lines = [proc.stdout.readline() for _ in range(4)]
        proc.stdin.write(calls[-1] + "\n")
        proc.stdin.flush()
        # Keep stdin open until every answer is in: closing it ends the session (and cancels calls).
        lines.append(proc.stdout.readline())
        proc.stdin.close()
        rest = proc.stdout.read()
        proc.wait()
    finally:
        watchdog.cancel()
        proc.stdout.close()
    stderr = err_path.read_text()
    assert proc.returncode == 0, stderr
    assert rest == ""
    messages = [json.loads(line) for line in lines]
    assert all(m.get("jsonrpc") == "2.0" for m in messages)
    assert sorted(m["id"] for m in messages) == [1, 2, 3, 4, 5]
    by_id = {m["id"]: m for m in messages}
    assert by_id[4]["result"]["isError"] is True
    assert by_id[5]["result"]["structuredContent"]["task"]["prompt"] == "p"
    assert stderr.strip(), "logs belong on stderr"


@pytest.mark.parametrize(
    ("extra_env", "args", "expected"),
    [
        ({"TASK_ORCHESTRATOR_LOG_LEVEL": "LOUD"}, [], "invalid setting TASK_ORCHESTRATOR_LOG_LEVEL"),
        ({"TASK_ORCHESTRATOR_DATABASE_URL": "mysql://h/db"}, [], "unsupported database 'mysql'"),
        ({"TASK_ORCHESTRATOR_DATABASE_URL": "not a url"}, [], "not a database URL"),
        ({"TASK_ORCHESTRATOR_DATABASE_URL": "sqlite:///:memory:"}, [], "in-memory SQLite database"),
        # URI file names: private in-memory databases (acknowledged writes were lost) or worse.
        ({"TASK_ORCHESTRATOR_DATABASE_URL": "sqlite:///file::memory:?uri=true"}, [], "URI file names"),
        ({"TASK_ORCHESTRATOR_DATABASE_URL": "sqlite:////tmp/t.db?mode=memory&uri=true"}, [], "URI file"),
        ({"TASK_ORCHESTRATOR_DATABASE_URL": "sqlite:////tmp/t.db?nolock=1&URI=1"}, [], "URI file names"),
        ({"TASK_ORCHESTRATOR_DATABASE_URL": "sqlite:///%66ile::memory:?%75ri=yes"}, [], "URI file names"),
        ({"TASK_ORCHESTRATOR_DATABASE_URL": "sqlite:///%3Amemory%3A"}, [], "in-memory SQLite database"),
        (
            {"TASK_ORCHESTRATOR_MAX_PAYLOAD_BYTES": "-1"},
            [],
            "invalid setting TASK_ORCHESTRATOR_MAX_PAYLOAD_BYTES",
        ),
        ({}, ["--log-level", "chatty"], "invalid setting TASK_ORCHESTRATOR_LOG_LEVEL"),
        ({"TASK_ORCHESTRATOR_WORKER_ID": "  "}, [], "invalid setting TASK_ORCHESTRATOR_WORKER_ID"),
        ({"TASK_ORCHESTRATOR_WORKER_ID": "w" * 257}, [], "invalid setting TASK_ORCHESTRATOR_WORKER_ID"),
        # Not UTF-8: os.environ gives it lone surrogates (was reported as a database failure, exit 1).
        ({"TASK_ORCHESTRATOR_WORKER_ID": "worker-\udcff"}, [], "invalid setting TASK_ORCHESTRATOR_WORKER_ID"),
    ],
)
def test_invalid_settings_stop_with_one_line(
    tmp_path: Path, extra_env: dict[str, str], args: list[str], expected: str
) -> None:
    env = server_env(f"sqlite:///{tmp_path / 't.db'}")
    env.update(extra_env)
    proc = run_server_once(env, *args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert expected in proc.stderr
    assert not (tmp_path / "t.db").exists()


def test_unusable_database_path_stops_with_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_server_once(server_env(f"sqlite:///{blocker / 'tasks.db'}"))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot use the database" in proc.stderr


def test_check_opens_the_database_and_says_where_it_is(tmp_path: Path) -> None:
    path = tmp_path / "new" / "t.db"
    # At the default level: the migration's own progress lines are not printed around the result.
    proc = run_server_once(server_env(f"sqlite:///{path}", TASK_ORCHESTRATOR_LOG_LEVEL="INFO"), "--check")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == f"task-orchestrator-mcp: the database sqlite:///{path} is ready (schema 0001)\n"
    with sqlite3.connect(path) as conn:  # created and brought to head, as serving would
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0001",)]


@pytest.mark.postgres
def test_check_refuses_a_database_it_can_read_but_not_write() -> None:
    """A database already at head is only read when opened: --check writes once, so a read-only one
    is reported now (exit 1), not on the first task."""
    admin = postgres_admin_url()
    assert admin is not None
    with fresh_postgres_database(admin) as url:
        assert run_server_once(server_env(url), "--check").returncode == 0
        with postgres_read_only(url):
            proc = run_server_once(server_env(url), "--check")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "read-only" in proc.stderr


@contextmanager
def _write_locked(path: Path) -> Iterator[None]:
    """A new SQLite database (WAL, one table, not ours) whose write lock another process holds."""
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("PRAGMA journal_mode = WAL")
        holder.execute("CREATE TABLE other (x)")
        holder.execute("BEGIN IMMEDIATE")
        yield
    finally:
        holder.close()


def test_check_reports_a_database_it_cannot_open_in_time(tmp_path: Path) -> None:
    """What a server whose client leaves at once cannot report (it stops waiting for the open after
    2 s): --check waits as long as the busy timeout, then says why, exit 1."""
    path = tmp_path / "t.db"
    with _write_locked(path):
        env = server_env(f"sqlite:///{path}", TASK_ORCHESTRATOR_BUSY_TIMEOUT_MS="300")
        proc = run_server_once(env, "--check")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot use the database" in proc.stderr
    assert "locked" in proc.stderr


def test_database_failing_after_the_handshake_stops_the_server_at_once(tmp_path: Path) -> None:
    """The database opens while the server answers initialize; if it fails, the server does not
    linger (its client still holds stdin open): one line on stderr, exit 1."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = subprocess.Popen(
        [sys.executable, "-m", "task_orchestrator_mcp"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=server_env(f"sqlite:///{blocker / 'tasks.db'}"),
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    assert proc.stderr is not None
    try:
        proc.stdin.write(json.dumps(INIT) + "\n")
        proc.stdin.flush()
        answer = proc.stdout.readline()
        returncode = proc.wait(timeout=60)  # stdin is still open
        stderr = proc.stderr.read()
    finally:
        proc.kill()
        proc.stdin.close()
        proc.stdout.close()
        proc.stderr.close()
    if answer:  # the failure may also come before the answer is written
        assert json.loads(answer)["id"] == 1
    assert returncode == 1
    assert stderr.count("\n") == 1, stderr
    assert "cannot use the database" in stderr


def test_flags_override_environment_and_log_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'flag.db'}"
    log = tmp_path / "logs" / "server.log"
    env = server_env("sqlite:////nonexistent-dir/should-not-be-used.db", TASK_ORCHESTRATOR_LOG_LEVEL="DEBUG")
    proc = subprocess.run(
        [sys.executable, "-m", "task_orchestrator_mcp", "--database-url", url, "--log-file", str(log)],
        input=json.dumps(INIT) + "\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[0])["result"]["serverInfo"]["name"] == "task-orchestrator"
    assert (tmp_path / "flag.db").exists()
    assert "serving MCP on stdio" in log.read_text()
    assert proc.stderr == ""


def test_a_log_file_name_is_taken_as_it_is_and_empty_means_stderr(tmp_path: Path) -> None:
    # Braces used to be read as a template by the logging library: a traceback, or a renamed file.
    log = tmp_path / "x{y}-{time}.log"
    url = f"sqlite:///{tmp_path / 't.db'}"
    proc = run_server_once(
        server_env(url, TASK_ORCHESTRATOR_LOG_FILE=str(log), TASK_ORCHESTRATOR_LOG_LEVEL="INFO")
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "serving MCP on stdio" in log.read_text()
    assert sorted(p.name for p in tmp_path.glob("*.log")) == [log.name]
    # Client configurations write "" for "not set": logs go to stderr, as with no setting.
    proc = run_server_once(server_env(url, TASK_ORCHESTRATOR_LOG_FILE="", TASK_ORCHESTRATOR_LOG_LEVEL="INFO"))
    assert proc.returncode == 0, proc.stderr
    assert "serving MCP on stdio" in proc.stderr


def test_version_flag() -> None:
    proc = run_server_once(server_env("sqlite:////tmp/unused.db"), "--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("task-orchestrator-mcp ")


def _spawn(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "task_orchestrator_mcp"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def test_a_client_that_dies_with_answers_on_their_way_leaves_a_clean_exit(tmp_path: Path) -> None:
    """Both pipes close at once, as when the client is killed, just after requests it will never read
    the answers to: the server's write meets a broken pipe. It ends with 0 and no traceback (it
    used to exit 1 with a traceback on stderr in every run of this)."""
    env = server_env(f"sqlite:///{tmp_path / 't.db'}")
    for _ in range(3):
        proc = _spawn(env)
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write((json.dumps(INIT) + "\n").encode())
        proc.stdin.flush()
        assert b'"result"' in proc.stdout.readline()
        pings = "".join(_rpc(i, "ping") + "\n" for i in range(2, 12))
        proc.stdin.write(pings.encode())
        proc.stdin.flush()
        proc.stdout.close()
        proc.stdin.close()
        code, stderr = _exit_of(proc, timeout=60)
        assert code == 0, stderr
        assert "Traceback" not in stderr, stderr


def test_a_client_that_leaves_does_not_wait_for_a_blocked_database_open(tmp_path: Path) -> None:
    """Another process holds SQLite's write lock on a new database, so the server's first migration
    waits (up to the 30 s busy timeout). A client that closes stdin meanwhile gets the server gone
    well before that, exit 0 (it used to wait the whole busy timeout, then exit 1)."""
    path = tmp_path / "t.db"
    with _write_locked(path):
        proc = _spawn(server_env(f"sqlite:///{path}", TASK_ORCHESTRATOR_BUSY_TIMEOUT_MS="30000"))
        assert proc.stdin is not None
        assert proc.stdout is not None
        proc.stdin.write((json.dumps(INIT) + "\n").encode())
        proc.stdin.flush()
        assert b'"result"' in proc.stdout.readline()  # answered while the database is opening
        proc.stdin.close()
        code, stderr = _exit_of(proc, timeout=20)  # not the 30 s busy timeout
        proc.stdout.close()
        assert code == 0, stderr


def _exit_of(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, str]:
    """The exit code and stderr of a server whose stdin is closed (its stderr is a few lines at most:
    the pipe cannot fill up while we wait)."""
    assert proc.stderr is not None
    try:
        code = proc.wait(timeout=timeout)
    finally:
        proc.kill()
        proc.wait()
        stderr = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    return code, stderr


def test_an_empty_worker_id_setting_means_the_default(tmp_path: Path) -> None:
    """Client configurations write "" for "not set"."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 't.db'}", worker_id="")
    assert settings.worker_id is None


def _send_create(proc: subprocess.Popen[bytes], request_id: int, prompt: str) -> None:
    assert proc.stdin is not None
    call = {"name": "create_task", "arguments": {"work_directory": "/w", "prompt": prompt}}
    proc.stdin.write(f"{_rpc(request_id, 'tools/call', call)}\n".encode())
    proc.stdin.flush()


def _serving(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A server past the handshake whose database is open (one task created), stdin left open."""
    proc = _spawn(env)
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.write(f"{json.dumps(INIT)}\n".encode())
    _send_create(proc, 2, "kept")
    assert b'"result"' in proc.stdout.readline()
    assert b'"kept"' in proc.stdout.readline()
    return proc


def _prompts(path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [row[0] for row in conn.execute("SELECT prompt FROM tasks ORDER BY created_at")]


def _signalled(proc: subprocess.Popen[bytes], signum: int) -> tuple[int, str, float]:
    """Send ``signum``; the exit code, stderr, and the seconds from the signal to the exit."""
    started = time.monotonic()
    proc.send_signal(signum)
    code, stderr = _exit_of(proc, timeout=20)
    return code, stderr, time.monotonic() - started


def _rest_of_stdout(proc: subprocess.Popen[bytes]) -> bytes:
    """Close an exited server's pipes; what it wrote on stdout that was not read yet."""
    assert proc.stdin is not None
    assert proc.stdout is not None
    proc.stdin.close()
    rest = proc.stdout.read()
    proc.stdout.close()
    return rest


@pytest.mark.parametrize(("signum", "name"), [(signal.SIGINT, "SIGINT"), (signal.SIGTERM, "SIGTERM")])
def test_ctrl_c_or_sigterm_stops_a_server_whose_stdin_is_still_open(
    tmp_path: Path, signum: int, name: str
) -> None:
    """Ctrl-C at a terminal, or SIGTERM from a client or supervisor, while stdin stays open: the server
    closes its database and exits with 128 + the signal's number (it used to ignore Ctrl-C until the
    next line arrived on stdin, the SDK's read of stdin being stuck on a thread)."""
    path = tmp_path / "t.db"
    proc = _serving(server_env(f"sqlite:///{path}", TASK_ORCHESTRATOR_LOG_LEVEL="INFO"))
    code, stderr, _ = _signalled(proc, signum)
    _rest_of_stdout(proc)
    assert code == 128 + signum, stderr
    assert f"{name} received: stopping" in stderr
    assert "stopped" in stderr
    assert "Traceback" not in stderr, stderr
    assert _prompts(path) == ["kept"]


@contextmanager
def _a_call_waiting_for_the_lock(path: Path, prompt: str, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """A server (one task, "kept", created) whose create_task of ``prompt`` (request 3) waits for
    SQLite's write lock, which another process holds until the block ends (busy timeout 30 s)."""
    proc = _serving(server_env(f"sqlite:///{path}", TASK_ORCHESTRATOR_BUSY_TIMEOUT_MS="30000", **env))
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        _send_create(proc, 3, prompt)
        assert wait_for_the_write_gate(path), "the write never waited at the gate"
        yield proc
    finally:
        holder.close()


def test_a_signal_does_not_wait_for_a_call_stuck_on_the_database(tmp_path: Path) -> None:
    """A create_task waits for a write lock another process holds (busy timeout 30 s) when SIGTERM
    comes: the server exits within its grace period, and the call it never answered left nothing."""
    path = tmp_path / "t.db"
    with _a_call_waiting_for_the_lock(path, "never answered") as proc:
        code, stderr, waited = _signalled(proc, signal.SIGTERM)
    unanswered = _rest_of_stdout(proc)
    assert code == 128 + signal.SIGTERM, stderr
    assert "exiting now" in stderr, stderr
    assert waited < 15, waited  # the grace period (3 s), not the busy timeout
    assert unanswered == b""
    assert _prompts(path) == ["kept"]


def test_a_client_that_closes_stdin_after_its_requests_gets_every_answer(tmp_path: Path) -> None:
    """``printf requests | task-orchestrator-mcp``: stdin ends right after the requests. Each gets its
    answer before the server exits 0 (the SDK cancels what is still running at the end of stdin: the
    create_task below was carried out but never answered)."""
    calls = [
        ("create_task", {"work_directory": "/w", "prompt": "piped"}),
        ("create_task", {"work_directory": "/w", "prompt": "piped too"}),
        ("acquire_task", {"work_directory": "/w"}),
        ("list_tasks", {}),
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "task_orchestrator_mcp"],
        input="\n".join(_session(*calls)) + "\n",
        capture_output=True,
        text=True,
        env=server_env(f"sqlite:///{tmp_path / 't.db'}"),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    answers = _answers(proc.stdout)
    assert sorted(answers) == [1, 2, 3, 4, 5]
    assert all("result" in answer and not answer["result"].get("isError") for answer in answers.values())
    # The calls run concurrently, in no set order: the claim may come before either task exists.
    created = {answers[n]["result"]["structuredContent"]["task_id"] for n in (2, 3)}
    claimed = answers[4]["result"]["structuredContent"]["task"]
    assert claimed is None or claimed["task_id"] in created


def test_a_signal_lets_the_calls_running_finish_and_answers_them(tmp_path: Path) -> None:
    """SIGTERM while a create_task waits for a lock another process holds, which it lets go 0.8 s later:
    that call finishes and is answered, a call sent after the signal is refused, then exit 143 (the
    running call used to be cancelled, its write committed and its answer never sent)."""
    path = tmp_path / "t.db"
    with _a_call_waiting_for_the_lock(path, "running", TASK_ORCHESTRATOR_LOG_LEVEL="INFO") as proc:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # the server has seen the signal
        _send_create(proc, 4, "too late")
        time.sleep(0.3)
    code, stderr = _exit_of(proc, timeout=20)
    answers = {
        message["id"]: message["result"] for message in map(json.loads, _rest_of_stdout(proc).splitlines())
    }
    assert code == 128 + signal.SIGTERM, stderr
    assert "stopped" in stderr, stderr
    assert answers[3]["structuredContent"]["prompt"] == "running"
    assert answers[4]["isError"] is True
    assert "the server is stopping" in answers[4]["content"][0]["text"]
    assert _prompts(path) == ["kept", "running"]


def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    """Ctrl-C twice while a call waits on a lock: the second one does not wait out the grace period."""
    path = tmp_path / "t.db"
    with _a_call_waiting_for_the_lock(path, "stuck") as proc:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        code, stderr, waited = _signalled(proc, signal.SIGINT)
    _rest_of_stdout(proc)
    assert code == 128 + signal.SIGINT, stderr
    assert "SIGINT received again: exiting now" in stderr, stderr
    assert waited < 1.5, waited  # not the 2 s given to running calls, nor the 3 s grace
    assert _prompts(path) == ["kept"]


def test_a_client_slow_to_read_still_gets_every_answer_after_closing_stdin(tmp_path: Path) -> None:
    """200 creates, stdin closed, and the client starts reading only 2 s later: the answers that did
    not fit in the pipe waited on the server's writer, and the end of stdin cancelled them (17 of 200
    arrived; all 200 tasks were stored)."""
    count = 200
    proc = _spawn(server_env(f"sqlite:///{tmp_path / 't.db'}"))
    assert proc.stdin is not None
    assert proc.stdout is not None
    lines = _session(*[("create_task", {"work_directory": "/w", "prompt": "x" * 500})] * count)
    proc.stdin.write(("\n".join(lines) + "\n").encode())
    proc.stdin.close()
    time.sleep(2)
    answered = {json.loads(line)["id"] for line in proc.stdout.read().splitlines()}
    proc.stdout.close()
    code, stderr = _exit_of(proc, timeout=60)
    assert code == 0, stderr
    assert answered == set(range(1, count + 2))
    assert len(_prompts(tmp_path / "t.db")) == count


@pytest.mark.parametrize(
    ("fd", "says"), [(0, "stdin is closed"), (1, "stdout is closed")], ids=["stdin", "stdout"]
)
def test_a_server_started_with_stdin_or_stdout_closed_says_so_in_one_line(
    tmp_path: Path, fd: int, says: str
) -> None:
    """``task-orchestrator-mcp >&-`` or ``<&-``: no one could read an answer, or send a request. One
    line and exit 2 (each was a traceback of an AttributeError)."""
    proc = subprocess.run(
        [sys.executable, "-m", "task_orchestrator_mcp"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=server_env(f"sqlite:///{tmp_path / 't.db'}"),
        timeout=60,
        check=False,
        preexec_fn=lambda: os.close(fd),
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert says in proc.stderr


def test_requests_from_a_file_given_as_stdin_are_all_answered(tmp_path: Path) -> None:
    """``task-orchestrator-mcp < requests.jsonl``: a regular file cannot be polled by the event loop,
    so it is read on a worker thread; /dev/null as stdin is an empty session that exits 0."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text(
        "\n".join(_session(("create_task", {"work_directory": "/w", "prompt": "filed"}))) + "\n"
    )
    env = server_env(f"sqlite:///{tmp_path / 't.db'}")
    for source, expected in ((requests, [1, 2]), (Path(os.devnull), [])):
        with source.open("rb") as stdin:
            proc = subprocess.run(
                [sys.executable, "-m", "task_orchestrator_mcp"],
                stdin=stdin,
                capture_output=True,
                env=env,
                timeout=60,
                check=False,
            )
        assert proc.returncode == 0, proc.stderr
        assert sorted(_answers(proc.stdout)) == expected
    assert _prompts(tmp_path / "t.db") == ["filed"]


def test_a_socket_as_stdin_and_stdout_works_as_a_pipe_does(tmp_path: Path) -> None:
    """libuv (Node, so many MCP clients) gives a child a Unix socket pair as stdin and stdout, not
    pipes. Two creates, then the end of input (a half-close), and both are answered."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        proc = subprocess.Popen(
            [sys.executable, "-m", "task_orchestrator_mcp"],
            stdin=theirs.fileno(),
            stdout=theirs.fileno(),
            stderr=subprocess.PIPE,
            env=server_env(f"sqlite:///{tmp_path / 't.db'}"),
        )
        theirs.close()
        calls = [("create_task", {"work_directory": "/w", "prompt": p}) for p in ("one", "two")]
        ours.sendall(("\n".join(_session(*calls)) + "\n").encode())
        ours.shutdown(socket.SHUT_WR)
        received = b""
        ours.settimeout(60)
        while chunk := ours.recv(1 << 16):
            received += chunk
    code, stderr = _exit_of(proc, timeout=60)
    assert code == 0, stderr
    assert sorted(_answers(received)) == [1, 2, 3]
    assert sorted(_prompts(tmp_path / "t.db")) == ["one", "two"]


def test_a_request_sent_in_pieces_and_a_last_line_without_its_newline_are_read_whole(tmp_path: Path) -> None:
    """A 300 KB request arrives in three writes, 0.2 s apart (more than one read, with the event loop
    waiting between them); the last request has no newline before the end of input."""
    prompt = "é" * 150_000  # 300 KB of UTF-8: a piece may end inside a character
    big = _session(("create_task", {"work_directory": "/w", "prompt": prompt}))
    last = _rpc(3, "tools/call", {"name": "list_tasks", "arguments": {}})
    data = ("\n".join(big) + "\n" + last).encode()
    proc = _spawn(server_env(f"sqlite:///{tmp_path / 't.db'}"))
    assert proc.stdin is not None
    assert proc.stdout is not None
    cut = len(data) // 3 + 1
    for start in range(0, len(data), cut):
        proc.stdin.write(data[start : start + cut])
        proc.stdin.flush()
        time.sleep(0.2)
    proc.stdin.close()
    answers = _answers(proc.stdout.read())
    proc.stdout.close()
    code, stderr = _exit_of(proc, timeout=60)
    assert code == 0, stderr
    assert sorted(answers) == [1, 2, 3]
    assert answers[2]["result"]["structuredContent"]["prompt"] == prompt
    assert len(answers[3]["result"]["structuredContent"]["tasks"]) == 1


def test_a_request_larger_than_any_call_can_need_is_refused_unread(tmp_path: Path) -> None:
    """A 7 MB create_task (over the 6.25 MB a 1 MiB payload can take as JSON) gets a JSON-RPC error
    with its id, and creates nothing; the server reads on and answers the next call."""
    path = tmp_path / "t.db"
    lines = _session(
        ("create_task", {"work_directory": "/w", "prompt": "x" * (7 << 20)}),
        ("create_task", {"work_directory": "/w", "prompt": "small"}),
    )
    proc = _spawn(server_env(f"sqlite:///{path}"))
    stdout, stderr = proc.communicate(("\n".join(lines) + "\n").encode(), timeout=60)
    assert proc.returncode == 0, stderr.decode(errors="replace")
    answers = _answers(stdout)
    assert answers[2]["error"]["code"] == -32600
    assert "Message too large" in answers[2]["error"]["message"]
    assert answers[3]["result"]["structuredContent"]["prompt"] == "small"
    assert _prompts(path) == ["small"]
