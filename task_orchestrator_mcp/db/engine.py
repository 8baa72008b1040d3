"""Engines per backend, and the one way to run a transaction against them.

SQLite: pysqlite's legacy transaction handling emits no BEGIN before SELECT or DDL, so we follow
SQLAlchemy's documented recipe (autocommit at the driver, BEGIN emitted by us) and start every write
transaction with ``BEGIN IMMEDIATE``: the write lock is taken up front, so a transaction never has to
upgrade a read lock (which fails at once with SQLITE_BUSY instead of waiting for busy_timeout).
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from loguru import logger
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Dialect, ExceptionContext, make_url
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, QueuePool

from task_orchestrator_mcp.db.write_gate import STARVING_AFTER_MS, WriteGate
from task_orchestrator_mcp.errors import DatabaseError, DatabaseUnavailable, StorageError

_WRITE = "task_orchestrator_write"
# A PostgreSQL connection used this recently is reused without the pool's ping (a round trip per
# transaction). The price: a server restart inside that window costs each server process one call
# answered "unavailable, retry" (which recycles its pool), where the ping would have reconnected.
_PG_TRUST_SECONDS = 1.0
# SQLite copies its WAL back into the database file (a checkpoint) inside the commit that makes the
# WAL reach wal_autocheckpoint pages: that one caller waits for the copy and its fsyncs, several
# milliseconds on a large database (acquire's p99 at 1M tasks was 3x its p99 at 10k, all of it in
# those commits). A checkpoint running beside a commit slows it too (they share the disk), so each
# process checkpoints on a background thread once the database has been quiet for a moment after it
# wrote; under writes with no pause the automatic checkpoint stays as the backstop, at a higher
# threshold (rarer, and a page written many times in between is copied once).
_CHECKPOINT_AFTER_QUIET_SECONDS = 0.05
_AUTOCHECKPOINT_BACKSTOP_PAGES = 4000


class DriverConnection:
    """One pooled driver connection inside a transaction: where the repository runs its prepared SQL.

    The service's transactions skip SQLAlchemy's Connection and execution context: they cost about
    0.1 ms per statement and per transaction, more than SQLite takes to run the statement itself.
    """

    __slots__ = ("_raw", "dialect", "is_sqlite")

    def __init__(self, raw: Any, dialect: Dialect) -> None:
        self._raw = raw
        self.dialect = dialect
        self.is_sqlite = dialect.name == "sqlite"

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        """Run one statement; the DB-API cursor (fetchone / fetchall)."""
        return self._raw.execute(sql, params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any] | dict[str, Any]]) -> None:
        """Run one statement once per parameter set."""
        self._raw.cursor().executemany(sql, rows)


class Database:
    """An engine plus transaction helpers; one per server process, opened by the server on a thread
    (``server.OpeningDatabase``). The service runs on :meth:`transaction`; migrations and tests use
    SQLAlchemy's own connections through :meth:`write` and :meth:`read`."""

    def __init__(
        self,
        url: str,
        *,
        busy_timeout_ms: int = 30_000,
        sqlite_synchronous: str = "FULL",
        pool_size: int = 4,
    ) -> None:
        try:
            self.url = make_url(url)
        except (sa_exc.ArgumentError, ValueError) as exc:
            raise DatabaseError(f"Not a valid database URL: {exc}.") from None
        self.dialect = self.url.get_backend_name()
        self.is_sqlite = self.dialect == "sqlite"
        self._busy_timeout_ms = busy_timeout_ms
        # SQLite: bounds how long one writer can lose the lock to the others (see write_gate).
        self.write_gate: WriteGate | None = None
        driver = self.url.get_driver_name()
        if self.dialect == "sqlite" and driver in ("", "pysqlite"):
            path = _sqlite_file(self.url)
            if path is not None:
                # One absolute path for pysqlite, the folder made for it and the write gate beside it.
                self.url = self.url.set(database=path)
            self.engine = _sqlite_engine(self.url, path, busy_timeout_ms, sqlite_synchronous, pool_size)
            if path is not None and busy_timeout_ms > STARVING_AFTER_MS:
                self.write_gate = WriteGate.beside(path)
        elif self.dialect == "postgresql" and driver in ("", "psycopg"):
            # The service speaks psycopg 3 directly; a bare postgresql:// means it too (SQLAlchemy's
            # own default would be psycopg2).
            self.url = self.url.set(drivername="postgresql+psycopg")
            self.engine = _postgres_engine(self.url, pool_size)
        else:
            raise DatabaseError(
                f"Unsupported database driver {self.url.drivername!r}: use sqlite:///path/to/tasks.db "
                "or postgresql+psycopg://user@host/db."
            )
        self._writer = self.engine.execution_options(**{_WRITE: True})
        # PostgreSQL's default READ COMMITTED gives each statement its own snapshot; a read of a task
        # and then its history must see one moment. (SQLite's BEGIN already gives one snapshot.)
        self._reader = (
            self.engine.execution_options(isolation_level="REPEATABLE READ")
            if self.dialect == "postgresql"
            else self.engine
        )
        event.listen(self.engine, "handle_error", _recycle_read_only)
        # Driver connections kept between transactions, tagged with the generation they were opened
        # in and when they were last used: a round trip through SQLAlchemy's pool costs more than a
        # SQLite transaction, and on PostgreSQL its pre-ping is one more round trip per transaction.
        # At most the pool's resting size; past it, connections go back to SQLAlchemy's pool, where
        # a caller waiting for one gets it.
        self._idle: list[_Pooled] = []
        self._keep_idle = pool_size
        self._generation = 0
        self._closed = False
        self.checkpointer = _Checkpointer(self.engine) if self.is_sqlite else None

    def transaction(self, *, write: bool) -> _Transaction:
        """The service's transactions, on the driver connection: committed on success, rolled back on
        any error. Writes take SQLite's write lock up front (BEGIN IMMEDIATE); reads see one snapshot
        (SQLite's BEGIN, PostgreSQL's REPEATABLE READ). Driver errors become domain errors.

        Use as ``with database.transaction(write=True) as conn:``."""
        return _Transaction(self, write)

    def _checkout(self) -> _Pooled:
        idle = self._idle
        now = 0.0 if self.is_sqlite else time.monotonic()
        while idle:
            try:
                pooled = idle.pop()  # atomic under the GIL: no lock needed
            except IndexError:
                break
            if pooled.generation != self._generation:
                # Given back by a thread that checked the generation just before a recycle.
                pooled.fairy.invalidate()
            elif self.is_sqlite or now - pooled.used < _PG_TRUST_SECONDS:
                return pooled
            else:
                pooled.fairy.close()  # idle a while: back to the pool, which pings it before reuse
        generation = self._generation
        # The pool pings PostgreSQL connections here (pool_pre_ping) and reconnects if one is stale.
        try:
            with translate_errors():  # what SQLAlchemy's pool raises itself (a timeout, when exhausted)
                return _Pooled(generation, self.engine.raw_connection(), self.engine.dialect)
        except self._driver_error as exc:  # a connect or ping error, straight from the driver
            raise self._translate_driver_error(exc, None) from exc

    def _checkin(self, pooled: _Pooled, write: bool) -> None:
        fairy = pooled.fairy
        if not fairy.is_valid:
            fairy.close()
            return
        raw = pooled.raw
        if pooled.generation != self._generation or self._closed or _in_transaction(raw, self.is_sqlite):
            # Opened before the pool was recycled, or the database is closed, or a rollback failed.
            fairy.invalidate()
            return
        if not self.is_sqlite:
            if not write:
                _reset_isolation(raw)
            pooled.used = time.monotonic()
        if len(self._idle) >= self._keep_idle or self._callers_may_wait_in_pool():
            fairy.close()
            return
        self._idle.append(pooled)
        if self._closed:  # dispose() ran between the check above and the append
            self._drop_idle(invalidate=False)

    def _callers_may_wait_in_pool(self) -> bool:
        """More connections out than the pool's resting size: give this one back to the pool."""
        pool = self.engine.pool
        # checkedout() > size() comes down to overflow() > qsize(), so overflow() <= 0 settles it
        # without qsize()'s lock.
        return isinstance(pool, QueuePool) and pool.overflow() > 0 and pool.checkedout() > pool.size()

    @property
    def has_idle_connection(self) -> bool:
        """True if a transaction can start now without waiting for the pool."""
        return bool(self._idle)

    def _recycle(self, fairy: PoolProxiedConnection, exc: Exception) -> None:
        """Drop this connection and every pooled one, as SQLAlchemy does on a disconnect."""
        self._generation += 1
        self.engine.pool._invalidate(fairy, exc)
        self._drop_idle(invalidate=True)

    @property
    def _driver_error(self) -> type[Exception]:
        error: type[Exception] = self.engine.dialect.loaded_dbapi.Error
        return error

    def _translate_driver_error(self, exc: Exception, fairy: PoolProxiedConnection | None) -> DatabaseError:
        raw = None if fairy is None else fairy.driver_connection
        disconnect = self.engine.dialect.is_disconnect(exc, raw, None)  # type: ignore[arg-type]
        if fairy is not None and (disconnect or _is_read_only(exc)):
            # A read-only connection stays read-only for its life; see _recycle_read_only.
            self._recycle(fairy, exc)
        wrapped = sa_exc.DBAPIError.instance(
            None, None, exc, self._driver_error, connection_invalidated=disconnect
        )
        assert isinstance(wrapped, sa_exc.DBAPIError)  # a driver error always wraps as one
        return _translate(wrapped)

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A SQLAlchemy write transaction (SQLite: BEGIN IMMEDIATE), for migrations and maintenance;
        committed on success, rolled back on error."""
        with translate_errors(), self._writer.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A SQLAlchemy read transaction: one consistent snapshot for every query inside it."""
        with translate_errors(), self._reader.begin() as conn:
            yield conn

    def dispose(self) -> None:
        """Close every pooled connection (one still in use is closed when its transaction ends)."""
        self._closed = True
        if self.checkpointer is not None:
            self.checkpointer.stop()
        self._drop_idle(invalidate=False)
        self.engine.dispose()

    def _drop_idle(self, *, invalidate: bool) -> None:
        """Empty the kept connections: closed (back to the pool), or invalidated (never reused)."""
        while self._idle:
            try:
                pooled = self._idle.pop()
            except IndexError:  # another thread took the last one
                break
            if invalidate:
                pooled.fairy.invalidate()
            else:
                pooled.fairy.close()


class _Pooled:
    """A driver connection the service's transactions use, with what they keep of it between
    transactions (made once per connection, not per transaction)."""

    __slots__ = ("conn", "fairy", "generation", "info", "raw", "used")

    def __init__(self, generation: int, fairy: PoolProxiedConnection, dialect: Dialect) -> None:
        self.generation = generation  # the pool generation it was opened in
        self.fairy = fairy
        self.raw: Any = fairy.driver_connection
        self.conn = DriverConnection(self.raw, dialect)
        self.info = fairy.info  # the pool's per-connection dict, which SQLAlchemy's events see too
        self.used = 0.0  # PostgreSQL: when it was last given back


class _Transaction:
    """The context manager behind :meth:`Database.transaction` (a class: it runs twice per claim, and
    contextlib's generator machinery costs more than SQLite's BEGIN)."""

    __slots__ = ("_changes", "_db", "_gate_closed", "_pooled", "_raw", "_write")

    def __init__(self, database: Database, write: bool) -> None:
        self._db = database
        self._write = write
        self._changes = 0
        self._gate_closed: int | None = None

    def __enter__(self) -> DriverConnection:
        db = self._db
        pooled = self._pooled = db._checkout()
        raw = self._raw = pooled.raw
        try:
            if db.is_sqlite:
                gate = db.write_gate
                if self._write and gate is not None:
                    # Waits in the busy handler only briefly, then at the gate (see write_gate).
                    _busy_timeout(pooled.info, raw, STARVING_AFTER_MS)
                    self._gate_closed = gate.begin(raw, db._busy_timeout_ms / 1000)
                else:
                    _busy_timeout(pooled.info, raw, db._busy_timeout_ms)  # if a gated write shortened it
                    raw.execute("BEGIN IMMEDIATE" if self._write else "BEGIN")
                self._changes = raw.total_changes  # a write that changed nothing needs no checkpoint
            else:
                # Takes effect at the implicit BEGIN of the first statement; no round trip here. Set
                # for writes too, whatever the database's default: the claim and the guarded updates
                # rely on READ COMMITTED re-checking a row another transaction has just changed
                # (REPEATABLE READ or SERIALIZABLE fail it as a serialization error).
                raw.isolation_level = _pg_isolation(self._write)
        except BaseException as exc:
            self._fail(exc)
        return pooled.conn

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _tb: object) -> None:
        if exc is None:
            db = self._db
            try:
                self._raw.commit()
            except BaseException as commit_error:
                self._fail(commit_error)
            try:
                self._open_gate()
                if db.checkpointer is not None and self._raw.total_changes != self._changes:
                    db.checkpointer.committed()
            finally:  # committed: the connection goes back even if an interrupt lands here
                db._checkin(self._pooled, self._write)
            return
        translated = self._abort(exc)
        if translated is not None:
            raise translated from exc
        # Returning (falsy) lets ``exc`` itself propagate.

    def _fail(self, exc: BaseException) -> NoReturn:
        """Abort, then raise ``exc`` (a driver error as its domain error)."""
        translated = self._abort(exc)
        if translated is None:
            raise exc
        raise translated from exc

    def _abort(self, exc: BaseException) -> DatabaseError | None:
        """Roll back and give the connection back; a driver error comes back as the domain error to
        raise instead (translated first: a lost connection must be dropped, not pooled)."""
        db = self._db
        try:
            _rollback_quietly(self._raw)
        finally:
            self._open_gate()
        try:
            if isinstance(exc, db._driver_error):
                return db._translate_driver_error(exc, self._pooled.fairy)
            return None
        finally:
            db._checkin(self._pooled, self._write)

    def _open_gate(self) -> None:
        closed = self._gate_closed
        if closed is not None:
            self._gate_closed = None
            assert self._db.write_gate is not None  # only a gate closes
            self._db.write_gate.end(closed)


class _Checkpointer:
    """SQLite only: checkpoints the WAL on a background thread once the database has been quiet for a
    moment after this process wrote to it, so that no caller's commit pays for it.

    Quiet means no commit by anyone, this process or any other sharing the file (``PRAGMA
    data_version`` tells). Quiet used to mean this process's own commits: with 16 processes writing
    without pause, each one kept from the lock for 50 ms then checkpointed beside the others'
    commits, about 140 times a second (tests/benchmarks/FINDINGS.md). Under writes with no pause,
    SQLite's own checkpoint, every 4,000 WAL pages, does the work instead.

    PASSIVE checkpoints never wait for readers or writers. Several processes may each run one;
    SQLite lets one checkpoint at a time and the others return at once. Started by the first commit
    that changed rows (a process that only reads never starts it); the thread keeps one connection of
    its own, outside the callers' pool.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._wake = threading.Event()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.runs = 0  # checkpoints run, complete or not (for tests and diagnostics)

    def committed(self) -> None:
        """Note a commit of this process that changed rows. Never raises: the caller's transaction
        is committed, and a checkpoint that does not happen here is done by SQLite's backstop."""
        try:
            if self._thread is None:
                self._start()
            if not self._wake.is_set():
                self._wake.set()
        except Exception as exc:  # e.g. "can't start new thread" under a thread limit
            logger.debug("background checkpoint not scheduled: {}", exc)

    def stop(self) -> None:
        """Stop the thread (after the checkpoint it may be running); it closes its connection."""
        self._stopped = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None and not self._stopped:
                thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
                thread.start()
                self._thread = thread

    def _run(self) -> None:
        own: PoolProxiedConnection | None = None  # this thread's connection, opened when first needed
        try:
            while True:
                self._wake.wait()  # a commit since the last checkpoint
                if self._stopped:
                    return
                try:
                    if own is None:
                        own = self._engine.raw_connection()  # with the engine's pragmas
                        own.detach()  # out of the pool (takes no caller's slot); close() closes it
                    driver: Any = own.dbapi_connection
                    if not self._wait_until_quiet(driver):
                        return
                    # Cleared here, not before the wait: the commits of the quiet wait are in this one.
                    self._wake.clear()
                    driver.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.runs += 1
                except Exception as exc:  # the backstop still checkpoints; a request reports the cause
                    logger.debug("background checkpoint failed: {}", exc)
                    self._wake.clear()  # the next commit tries again
                    _close_quietly(own)
                    own = None
        finally:
            _close_quietly(own)

    def _wait_until_quiet(self, driver: Any) -> bool:
        """Sleep until a whole quiet period passes with no commit to the database (``data_version``
        changes when another connection commits, in this process or another). False if stopped."""
        version = driver.execute("PRAGMA data_version").fetchone()[0]
        while not self._stopped:
            time.sleep(_CHECKPOINT_AFTER_QUIET_SECONDS)
            now = driver.execute("PRAGMA data_version").fetchone()[0]
            if now == version:
                return not self._stopped
            version = now
        return False


def _close_quietly(conn: PoolProxiedConnection | None) -> None:
    """Close a connection, if any."""
    if conn is not None:
        try:
            conn.close()
        except Exception as exc:
            logger.debug("close failed: {}", exc)


_BUSY_TIMEOUT_KEY = "task_orchestrator_busy_timeout_ms"


def _busy_timeout(info: dict[Any, Any], raw: Any, ms: int) -> None:
    """Set the connection's busy timeout, if it is not already ``ms`` (a statement, if so); ``info``
    is the pool's dict of that connection, where the current value is noted."""
    if info.get(_BUSY_TIMEOUT_KEY) != ms:
        raw.execute(f"PRAGMA busy_timeout = {int(ms)}")
        info[_BUSY_TIMEOUT_KEY] = ms


def _rollback_quietly(raw: Any) -> None:
    # The error that got us here is the one to report; a failing rollback (lost connection) is not.
    try:
        raw.rollback()
    except Exception as exc:
        logger.debug("rollback failed: {}", exc)


def _in_transaction(raw: Any, sqlite: bool) -> bool:
    if sqlite:
        return bool(raw.in_transaction)
    from psycopg.pq import TransactionStatus

    return bool(raw.info.transaction_status != TransactionStatus.IDLE)


def _pg_isolation(write: bool) -> Any:
    from psycopg import IsolationLevel

    return IsolationLevel.READ_COMMITTED if write else IsolationLevel.REPEATABLE_READ


def _reset_isolation(raw: Any) -> None:
    try:
        raw.isolation_level = None
    except Exception as exc:
        logger.debug("could not reset the isolation level: {}", exc)


def _sqlite_file(url: URL) -> str | None:
    """The database file of an SQLite URL, absolute and with ``~`` expanded; None for an in-memory
    database or a ``file:`` URI (pysqlite opens those as given)."""
    path = url.database or ""
    if path in ("", ":memory:") or path.startswith("file:"):
        return None
    return os.path.abspath(os.path.expanduser(path))


def _sqlite_engine(
    url: URL, path: str | None, busy_timeout_ms: int, synchronous: str, pool_size: int
) -> Engine:
    if path is not None:  # the file, as _sqlite_file gives it (None: in memory, or a file: URI)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        # pysqlite's own timeout is the busy handler too; keep both the same.
        connect_args={"timeout": busy_timeout_ms / 1000, "check_same_thread": False},
        pool_size=pool_size,
        max_overflow=pool_size * 4,
        pool_timeout=busy_timeout_ms / 1000,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, record: ConnectionPoolEntry) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see module docstring)
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        record.info[_BUSY_TIMEOUT_KEY] = busy_timeout_ms
        # WAL lets readers run beside the one writer; the mode is stored in the file.
        mode = cur.execute("PRAGMA journal_mode").fetchone()[0]
        if mode.lower() != "wal":
            cur.execute("PRAGMA journal_mode = WAL")
        cur.execute(f"PRAGMA synchronous = {synchronous}")
        cur.execute(f"PRAGMA wal_autocheckpoint = {_AUTOCHECKPOINT_BACKSTOP_PAGES}")
        cur.execute("PRAGMA foreign_keys = ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        statement = "BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE, False) else "BEGIN"
        # SQLAlchemy-side transactions (migrations, tests). Straight to the driver, with SQLAlchemy's
        # error wrapping kept by hand, so a lock timeout still reaches translate_errors as a DBAPIError.
        try:
            fairy = conn.connection
            raw = fairy.dbapi_connection
            _busy_timeout(fairy.info, raw, busy_timeout_ms)  # the service's writes may have shortened it
            raw.execute(statement)  # type: ignore[union-attr]
        except sqlite3.Error as exc:
            raise sa_exc.DBAPIError.instance(statement, None, exc, sqlite3.Error) from exc

    return engine


# A stuck statement or an abandoned transaction must not hold row locks forever.
_PG_SESSION_OPTIONS = "-c statement_timeout=30000 -c idle_in_transaction_session_timeout=60000"


def _postgres_engine(url: URL, pool_size: int) -> Engine:
    # Many short-lived stdio processes share the server: a small pool, checked before use (so a
    # restarted PostgreSQL costs one reconnect, not an error), and bounded waits everywhere.
    # connect_args override the URL's own query parameters: ours are defaults, the URL's win (a
    # search_path in ?options=, say); session options are joined, the URL's last, so they win too.
    given = url.query
    connect_args: dict[str, Any] = {
        key: value
        for key, value in (("connect_timeout", 5), ("application_name", "task-orchestrator-mcp"))
        if key not in given
    }
    extra = given.get("options")
    extra_options = " ".join(extra) if isinstance(extra, tuple) else extra
    connect_args["options"] = (
        f"{_PG_SESSION_OPTIONS} {extra_options}" if extra_options else _PG_SESSION_OPTIONS
    )
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_recycle=1800,
        pool_timeout=10,
        connect_args=connect_args,
    )


_DISK_FULL = re.compile(r"database or disk is full|disk I/O error|file too large|No space left", re.I)
_READ_ONLY = re.compile(r"readonly database|read-only", re.I)
_CANNOT_OPEN = re.compile(r"unable to open database", re.I)
_LOCKED = re.compile(r"database is locked|database table is locked", re.I)
# PostgreSQL SQLSTATEs: disk_full, read_only_sql_transaction (also what a demoted primary answers).
_PG_DISK_FULL = "53100"
_PG_READ_ONLY = "25006"
_SQLITE_READONLY = 8  # primary result code; extended codes keep it in the low byte
_SQLITE_ERROR = 1  # the generic primary code (it has no extended codes)
# SQLSTATE classes worth retrying: connection (08), rollback/deadlock (40), resources (53),
# operator intervention/restart (57), lock not available (55P03). Any other SQLSTATE is permanent.
_PG_TRANSIENT = ("08", "40", "53", "57", "55P03")


@contextmanager
def translate_errors() -> Iterator[None]:
    """Turn driver errors into domain errors at the persistence edge; the message is for an agent."""
    try:
        yield
    except sa_exc.DBAPIError as exc:
        raise _translate(exc) from exc
    except sa_exc.TimeoutError as exc:  # pool exhausted
        raise DatabaseUnavailable("The database is busy (no free connection). Retry shortly.") from exc


def _translate(exc: sa_exc.DBAPIError) -> DatabaseError:  # noqa: PLR0911 - a table of cases
    message = str(exc.orig) if exc.orig is not None else str(exc)
    detail = message.strip().splitlines()[0] if message.strip() else type(exc).__name__
    logger.warning("database error: {}", detail)
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate == _PG_DISK_FULL or _DISK_FULL.search(message):
        return StorageError(
            "The database disk is full or failing; nothing was changed. Free space, then retry.", detail
        )
    if _is_read_only(exc.orig):
        return StorageError(
            "The database is read-only right now (file or directory permissions, a read-only disk, or a "
            "read-only server); nothing was changed. Reading still works; retry once it is writable.",
            detail,
        )
    if _CANNOT_OPEN.search(message):
        return StorageError(
            "The database file cannot be opened (missing, or its directory is not writable); "
            "nothing was changed.",
            detail,
        )
    if _LOCKED.search(message):
        return DatabaseUnavailable(
            "The database stayed locked past the busy timeout; nothing was changed. Retry.", detail
        )
    if sqlstate is not None and not exc.connection_invalidated and not sqlstate.startswith(_PG_TRANSIENT):
        # e.g. 54000 "index row size exceeds maximum": retrying would never help.
        return DatabaseError("The database rejected the request; nothing was changed.", detail)
    if getattr(exc.orig, "sqlite_errorcode", None) == _SQLITE_ERROR:
        # SQLite's generic error, raised as OperationalError: "no such table", "table ... already
        # exists" (a schema that is not ours), a syntax error. Permanent, as a SQLSTATE outside the
        # transient classes is.
        return DatabaseError("The database rejected the request; nothing was changed.", detail)
    if exc.connection_invalidated or isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
        return DatabaseUnavailable("The database is unavailable right now. Retry in a few seconds.", detail)
    return DatabaseError("The database rejected the request; nothing was changed.", detail)


def _is_read_only(orig: BaseException | None) -> bool:
    if orig is None:
        return False
    if getattr(orig, "sqlstate", None) == _PG_READ_ONLY:
        return True
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF == _SQLITE_READONLY:
        return True
    return bool(_READ_ONLY.search(str(orig)))


def _recycle_read_only(context: ExceptionContext) -> None:
    """Treat "the database is read-only" as a disconnect, so the whole pool is recycled.

    A connection that met a read-only database stays read-only for its life: SQLite opened the file
    read-only, a PostgreSQL session keeps ``default_transaction_read_only`` (or still points at a
    primary that was demoted). Without this, every pooled connection keeps refusing writes after the
    cause is gone, until the server restarts; with it, the next call reconnects and resumes.
    """
    if _is_read_only(context.original_exception):
        context.is_disconnect = True


def describe(url: str) -> str:
    """The URL with any password hidden, for logs and error lines."""
    return make_url(url).render_as_string(hide_password=True)
