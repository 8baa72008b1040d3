"""The exceptions of task-orchestrator-mcp.

Every error the service raises on purpose derives from :class:`TaskOrchestratorError`, and its message
is a sentence an agent can act on (no SQL, no traceback). The MCP layer turns any of them into an
``isError`` tool result with that message.

::

    TaskOrchestratorError
    ├── InvalidInput           bad arguments; nothing was changed
    ├── TaskNotFound           no task has that id
    ├── InvalidTransition      the task's status does not allow the operation
    ├── NotLeaseHolder         the caller does not hold the task (never had it, or lost its lease)
    └── DatabaseError          the database cannot serve the request right now
        ├── DatabaseUnavailable    unreachable, busy, or refusing connections
        └── StorageError           read-only database (file, disk or server), full disk
"""

from __future__ import annotations


class TaskOrchestratorError(Exception):
    """Root of every error the task service raises deliberately."""


class InvalidInput(TaskOrchestratorError, ValueError):
    """An argument is malformed or out of range; nothing was changed."""


class TaskNotFound(TaskOrchestratorError, LookupError):
    """No task has the given id."""

    def __init__(self, task_id: str) -> None:
        super().__init__(f"No task with id {task_id!r}. Use list_tasks to see existing task ids.")
        self.task_id = task_id


class InvalidTransition(TaskOrchestratorError):
    """The task's current status does not allow the requested operation."""


class NotLeaseHolder(TaskOrchestratorError):
    """The caller is not the worker currently holding the task."""


class DatabaseError(TaskOrchestratorError):
    """The database could not serve the request.

    ``detail`` keeps the first line of the driver's own message for logs and start-up errors; the
    message itself stays free of driver text, for the agent.
    """

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail


class DatabaseUnavailable(DatabaseError):
    """The database is unreachable, busy past the timeout, or refused the connection."""


class StorageError(DatabaseError):
    """The database cannot be written: read-only (file, directory, disk or server) or a full disk.

    Reads usually still work; writing resumes, in the same process, once the cause is gone.
    """
