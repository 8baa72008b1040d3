"""Domain and I/O models (pydantic): what the service returns and the MCP tools serialise."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Priority(StrEnum):
    """How urgent a task is; ``high`` is claimed before ``medium`` before ``low``."""

    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"


class TaskStatus(StrEnum):
    """Where a task is in its life."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """A final task never changes again."""
        return self in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)


PriorityName = Literal["high", "medium", "low"]
StatusName = Literal["pending", "in_progress", "completed", "failed", "cancelled"]

# A task result: any JSON object, or a plain string.
TaskResult = dict[str, Any] | str


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, use_enum_values=False)


class Task(_Model):
    """A unit of work: a prompt to carry out in a work directory."""

    task_id: str
    work_directory: str
    prompt: str
    priority: Priority
    tags: list[str]
    status: TaskStatus
    worker_id: str | None = Field(
        description="The holder while in_progress; the finisher once completed or failed."
    )
    attempts: int = Field(description="How many times the task has been claimed.")
    max_attempts: int
    result: TaskResult | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    lease_expires_at: datetime | None


class HistoryEntry(_Model):
    """One status change of a task."""

    from_status: TaskStatus | None
    to_status: TaskStatus
    worker_id: str | None
    at: datetime
    details: dict[str, Any] | None


class TaskWithHistory(Task):
    """A task and every status change it went through, oldest first."""

    history: list[HistoryEntry]


class TaskSummary(_Model):
    """A task as listed: the prompt may be shortened, the result and error are left out."""

    task_id: str
    work_directory: str
    prompt: str
    prompt_truncated: bool
    priority: Priority
    tags: list[str]
    status: TaskStatus
    worker_id: str | None
    attempts: int
    max_attempts: int
    created_at: datetime
    updated_at: datetime
    lease_expires_at: datetime | None


class AcquireResult(_Model):
    """The outcome of acquire_task: the claimed task, or null when nothing is pending."""

    task: Task | None


class TaskPage(_Model):
    """One page of list_tasks; pass ``next_cursor`` back to get the next page (null: no more)."""

    tasks: list[TaskSummary]
    next_cursor: str | None
