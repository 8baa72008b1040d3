"""SQLite only: a bound on how long one writer can lose the race for the write lock to the others.

SQLite makes a writer that finds the write lock taken sleep and retry (its busy handler: 1, 2, 5 ...
up to 100 ms between tries). A writer that is back a moment after its commit finds the lock free
while the others sleep, so one that lost a few times keeps losing: with 2 to 16 processes writing
without pause, the median claim waited 0.3 ms and the slowest 2-3 s.

Strict turns (an exclusive lock taken around every write) end that, but hand the lock from process to
process on every transaction, which cost 10-30% of the throughput here (README, Benchmarks). So the
busy handler keeps doing the work, within a budget (:data:`STARVING_AFTER_MS`), and only a writer
that used it up takes turns: it closes a gate (an exclusive ``flock`` on ``<database>-lock``), which
every writer of this server checks (a shared ``flock`` tried and dropped, two system calls) before it
begins. Writers that find the gate closed wait until it opens; the starving writer meets only those
already past it, each at most one transaction away from done, and it keeps the gate closed until it
commits. The slowest write then waits a little more than the budget (203-311 ms measured with 2 to
16 processes writing without pause), not seconds; the price is that a writer that loses waits the
whole budget, which becomes p99 under heavy contention. Each closing hands the lock to another
process and back, and the budget sets how often: at 16 processes, 100 ms closed the gate about 95
times a second, each transaction held the lock 321-453 us and the claims ran at 0.50-0.70x of a raw
loop's; 200 ms, about 47 times, 280-333 us and 0.71-0.80x, for a slowest write of 254-290 ms instead
of 181-276 (five rounds each; tests/benchmarks/FINDINGS.md).

The gate is advisory: only this server's transactions check it. Anything else that writes (the
``sqlite3`` shell, migrations) meets SQLite's lock and busy handler as before. A process that dies
with the gate closed opens it by dying (the kernel drops its flock). Every wait here ends at the
caller's deadline (the busy timeout), as SQLite's would have. Windows has no ``flock``: there is no
gate there.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from loguru import logger

if sys.platform != "win32":  # Windows has no flock: there, writers rely on SQLite's busy handler alone
    import fcntl

# A write that has waited this long for SQLite's lock stops relying on the busy handler's sleeps.
STARVING_AFTER_MS = 200
# How often a writer held at the gate, or a starving one, looks again: first soon (the wait is
# usually for a transaction or two, a fraction of a millisecond each), then less often (something
# else may hold SQLite's lock for long, and many processes may be waiting).
_FIRST_POLL_SECONDS = 0.0002
_MAX_POLL_SECONDS = 0.005
_SQLITE_BUSY = 5


class WriteGate:
    """The gate of one SQLite database, shared by the transactions of one :class:`Database`."""

    def __init__(self, lock_path: str) -> None:
        self._path = lock_path
        # Read-only is enough for flock, so a lock file another user created serves too.
        self._fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        # Closed when nothing can use it any more: a writer still under way after dispose() may.
        weakref.finalize(self, os.close, self._fd)
        # One starving writer per process closes the gate; the others of the process wait for it. (A
        # flock belongs to an open file, not a thread: each closing opens the file anew.)
        self._closing = threading.Lock()
        self.closings = 0  # how many times a starving writer closed the gate (for tests, diagnostics)

    @classmethod
    def beside(cls, database_path: str) -> WriteGate | None:
        """The gate of the database file at ``database_path``; None if its lock file cannot be opened
        (a read-only directory, say) or takes no flock (Windows; some network file systems), in which
        case writers rely on SQLite's busy handler alone."""
        if sys.platform == "win32":
            return None
        try:
            gate = cls(database_path + "-lock")
            try:  # a file system without flock refuses it here, not in the middle of a write
                fcntl.flock(gate._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                fcntl.flock(gate._fd, fcntl.LOCK_UN)
            except BlockingIOError:
                pass  # a starving writer has it closed right now: flock works
            return gate
        except OSError as exc:
            logger.debug("no write gate for {}: {}", database_path, exc)
            return None

    def begin(self, raw: Any, timeout: float) -> int | None:
        """``BEGIN IMMEDIATE`` on ``raw`` (whose busy timeout is STARVING_AFTER_MS) within ``timeout``
        seconds. Returns the file that keeps the gate closed, to pass to :meth:`end` once the
        transaction is over, or None if this writer did not close it. Raises SQLite's own "database
        is locked" error when the deadline passes."""
        deadline = time.monotonic() + timeout
        self._wait_open(deadline)
        if deadline - time.monotonic() < STARVING_AFTER_MS / 1000:
            # Less time left than the budget (it went at the gate): the busy handler's wait must end
            # at the deadline, not a budget after it.
            _begin_waiting(raw, deadline)
            return None
        if _began(raw):
            return None
        return self._begin_starving(raw, deadline)

    def end(self, closed: int | None) -> None:
        """Open the gate again if this writer closed it (after its commit or rollback)."""
        if closed is not None:
            try:
                os.close(closed)  # drops the flock
            finally:
                self._closing.release()

    def is_open(self) -> bool:
        """True if no starving writer has the gate closed right now."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        return True

    def _wait_open(self, deadline: float) -> None:
        pause = _FIRST_POLL_SECONDS
        while not self.is_open():
            pause = _pause(deadline, pause)

    def _reopen(self) -> int:
        """A new open file of the gate's lock file (a flock belongs to an open file, and this process
        checks the gate on its own). Through /proc/self/fd where there is one: a lock file deleted
        while servers run is still the one those servers share (a server started after the deletion
        makes a new one, and the two groups check different gates until the older servers restart).
        By path otherwise, created again if it was deleted."""
        try:
            return os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return os.open(self._path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)

    def _begin_starving(self, raw: Any, deadline: float) -> int | None:
        if not self._closing.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise _locked()
        try:
            fd = self._reopen()
        except OSError as exc:  # no gate to close: wait on SQLite's busy handler, to the deadline
            self._closing.release()
            logger.debug("cannot close the write gate: {}", exc)
            _begin_waiting(raw, deadline)
            return None
        try:
            pause = _FIRST_POLL_SECONDS
            while True:  # another process's starving writer may have the gate closed: its turn first
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    pause = _pause(deadline, pause)
            self.closings += 1
            # Only writers already past the gate are ahead now, each about to finish: look often, not
            # at the busy handler's intervals (up to 100 ms, while every other writer waits too).
            with _busy_timeout(raw, 0):
                pause = _FIRST_POLL_SECONDS
                while not _began(raw):
                    pause = _pause(deadline, pause)
            return fd
        except BaseException:
            os.close(fd)
            self._closing.release()
            raise


def _begin_waiting(raw: Any, deadline: float) -> None:
    """BEGIN IMMEDIATE with SQLite's busy handler waiting up to ``deadline``; its locked error if not."""
    with _busy_timeout(raw, max(0, int((deadline - time.monotonic()) * 1000))):
        if not _began(raw):
            raise _locked()


@contextmanager
def _busy_timeout(raw: Any, ms: int) -> Iterator[None]:
    """The connection's busy timeout set to ``ms`` for the block, then back to the gated writes' budget."""
    raw.execute(f"PRAGMA busy_timeout = {ms}")
    try:
        yield
    finally:
        raw.execute(f"PRAGMA busy_timeout = {STARVING_AFTER_MS}")


def _began(raw: Any) -> bool:
    """``BEGIN IMMEDIATE``: True if it began, False if SQLite's lock stayed busy (its busy timeout)."""
    try:
        raw.execute("BEGIN IMMEDIATE")
        return True
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode & 0xFF != _SQLITE_BUSY:
            raise
        return False


def _pause(deadline: float, seconds: float) -> float:
    """Sleep ``seconds`` before looking again, and return the next pause; SQLite's locked error
    once that would pass the deadline."""
    if time.monotonic() + seconds > deadline:
        raise _locked()
    time.sleep(seconds)
    return min(seconds * 2, _MAX_POLL_SECONDS)


def _locked() -> sqlite3.OperationalError:
    # SQLite's own error for a lock wait past the busy timeout, so that it is reported as one.
    error = sqlite3.OperationalError("database is locked")
    error.sqlite_errorcode = _SQLITE_BUSY
    error.sqlite_errorname = "SQLITE_BUSY"
    return error


__all__ = ["STARVING_AFTER_MS", "WriteGate"]
