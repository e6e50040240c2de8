"""The task state machine and the retry decision: plain functions, one table each."""

from __future__ import annotations

import pytest

from dispatcher.engine import failure_summary
from dispatcher.states import (
    Outcome,
    RetryDecision,
    TaskStatus,
    can_transition,
    decide_retry,
    sources_of,
)

P, R, C, F, X = (
    TaskStatus.PENDING,
    TaskStatus.PROCESSING,
    TaskStatus.COMPLETED,
    TaskStatus.FAILED,
    TaskStatus.CANCELLED,
)


@pytest.mark.parametrize(
    ("old", "new", "allowed"),
    [
        (P, R, True),
        (P, X, True),
        (P, F, True),
        (P, C, False),
        (P, P, False),
        (R, P, True),
        (R, C, True),
        (R, F, True),
        (R, X, True),
        (R, R, False),
        (C, P, False),
        (C, F, False),
        (C, X, False),
        (F, P, True),
        (F, R, False),
        (F, C, False),
        (X, P, True),
        (X, R, False),
        (X, C, False),
    ],
)
def test_transitions(old: TaskStatus, new: TaskStatus, allowed: bool) -> None:
    assert can_transition(old, new) is allowed


def test_terminal_states_are_final_except_retry() -> None:
    assert {s for s in TaskStatus if s.terminal} == {C, F, X}
    assert sources_of(P) == {R, F, X}
    assert sources_of(C) == {R}


@pytest.mark.parametrize(
    ("outcome", "attempts", "max_attempts", "expected"),
    [
        (Outcome.NODE_FAILED, 1, 3, RetryDecision(requeue=True, count_attempt=True)),
        (Outcome.NODE_FAILED, 2, 3, RetryDecision(requeue=True, count_attempt=True)),
        (Outcome.NODE_FAILED, 3, 3, RetryDecision(requeue=False, count_attempt=True)),
        (Outcome.JOB_FAILED, 1, 1, RetryDecision(requeue=False, count_attempt=True)),
        (Outcome.JOB_FAILED, 1, 2, RetryDecision(requeue=True, count_attempt=True)),
        # A full node or a busy model ran nothing: it never uses up the task's attempts.
        (Outcome.NOT_STARTED, 3, 3, RetryDecision(requeue=True, count_attempt=False)),
        (Outcome.NOT_STARTED, 1, 1, RetryDecision(requeue=True, count_attempt=False)),
    ],
)
def test_decide_retry(
    outcome: Outcome, attempts: int, max_attempts: int, expected: RetryDecision
) -> None:
    assert decide_retry(outcome, attempts, max_attempts) == expected


def test_failure_summary_names_every_counted_attempt() -> None:
    log = [
        {"node": "a", "error": "upload on a: connection refused", "counted": True},
        {"node": "b", "error": "node is full", "counted": False},
        {"node": "b", "error": "stalled: no progress for 600s at 20%", "counted": True},
    ]
    assert failure_summary(log) == (
        "failed after 2 attempt(s): attempt 1 on a: upload on a: connection refused; "
        "attempt 2 on b: stalled: no progress for 600s at 20%"
    )


def test_a_retry_starts_the_attempt_count_afresh() -> None:
    log = [
        {"node": "a", "job_id": "t.1", "error": "old failure", "counted": True},
        {"node": None, "job_id": None, "outcome": "retried", "counted": False},
        {"node": "b", "job_id": "t.2", "error": "new failure", "counted": True},
    ]
    assert failure_summary(log) == "failed after 1 attempt(s): attempt 1 on b: new failure"
