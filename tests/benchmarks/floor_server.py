"""The floor server: a bare ``MCPServer`` with one no-op tool, on the same interpreter as the real one.

With ``BENCH_FLOOR_DB`` set it also has ``noop_commit``: the no-op plus one raw ``sqlite3`` commit on
that file, with the real server's pragmas (WAL, synchronous=FULL, checkpoint every 4,000 pages), the
floor for write calls.

With ``BENCH_FLOOR_WIRE=ours`` it serves through the real server's stdio reader and writer
(``task_orchestrator_mcp.stdio``) instead of the SDK's: not a floor, but the measure of what that
wire alone saves a call.
"""

from __future__ import annotations

import os
import threading

from mcp.server import MCPServer


def build() -> MCPServer:
    """The floor server (one no-op tool; a committing no-op too when a database is given)."""
    server: MCPServer = MCPServer("floor")

    # async: it runs on the event loop, as the real server's SQLite reads do (a plain def would run
    # on a worker thread, a hand-off of ~0.15 ms that those reads do not pay).
    @server.tool()
    async def noop() -> str:
        """Do nothing."""
        return "ok"

    db_path = os.environ.get("BENCH_FLOOR_DB")
    if db_path:
        import sqlite3

        conn = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA wal_autocheckpoint = 4000")  # the real server's backstop too
        conn.execute("CREATE TABLE IF NOT EXISTS floor (id INTEGER PRIMARY KEY, at REAL)")
        # A plain def, run on a worker thread as the real server's writes are (a commit waits for the
        # disk: never on the event loop). One connection, one writer at a time.
        lock = threading.Lock()

        @server.tool()
        def noop_commit() -> str:
            """Commit one row."""
            with lock:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("INSERT INTO floor (at) VALUES (0)")
                conn.execute("COMMIT")
            return "ok"

    return server


if __name__ == "__main__":
    if os.environ.get("BENCH_FLOOR_WIRE") == "ours":
        import anyio

        from task_orchestrator_mcp.stdio import serve_stdio

        anyio.run(serve_stdio, build()._lowlevel_server)
    else:
        build().run()
