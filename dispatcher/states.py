"""Task states and the one place that allows or refuses a change of state.

pending ──▶ processing ──▶ completed
   │  ▲          │    └──▶ failed ──┐
   │  └──────────┘ (node failed,    │ retry (explicit)
   │     attempts left)             ▼
   └──────────────▶ cancelled ──▶ pending
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class TaskStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})

_ALLOWED: dict[TaskStatus, frozenset[TaskStatus]] = {
    TaskStatus.PENDING: frozenset(
        {TaskStatus.PROCESSING, TaskStatus.FAILED, TaskStatus.CANCELLED}  # failed: expired
    ),
    TaskStatus.PROCESSING: frozenset(
        {TaskStatus.PENDING, TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED}
    ),
    # Terminal states are final except through an explicit retry.
    TaskStatus.COMPLETED: frozenset(),
    TaskStatus.FAILED: frozenset({TaskStatus.PENDING}),
    TaskStatus.CANCELLED: frozenset({TaskStatus.PENDING}),
}


class InvalidTransition(Exception):
    def __init__(self, old: TaskStatus, new: TaskStatus) -> None:
        super().__init__(f"a {old.value} task cannot become {new.value}")
        self.old, self.new = old, new


def can_transition(old: TaskStatus, new: TaskStatus) -> bool:
    return new in _ALLOWED[old]


def sources_of(new: TaskStatus) -> frozenset[TaskStatus]:
    """Every state from which ``new`` may be entered (for conditional updates in the store)."""
    return frozenset(old for old, targets in _ALLOWED.items() if new in targets)


class Outcome(StrEnum):
    """How one attempt of a task on a node ended, as far as retrying is concerned."""

    NOT_STARTED = "not_started"  # node full (409) or model busy: costs no attempt
    NODE_FAILED = "node_failed"  # died, refused, 5xx, lost the job, stalled, timed out
    JOB_FAILED = "job_failed"  # the model ran and reported failure


@dataclass(frozen=True)
class RetryDecision:
    requeue: bool
    count_attempt: bool


def decide_retry(outcome: Outcome, attempts: int, max_attempts: int) -> RetryDecision:
    """After a failed attempt: send the task back to the queue, or fail it for good.

    ``attempts`` counts the attempts already charged, including the one that just ended.
    """
    if outcome is Outcome.NOT_STARTED:
        return RetryDecision(requeue=True, count_attempt=False)
    return RetryDecision(requeue=attempts < max_attempts, count_attempt=True)
