"""The SQLite store: durable across reopen, conditional transitions, callback outbox."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatcher.states import TaskStatus
from dispatcher.store import Task, TaskStore


def make_task(task_id: str, priority: int = 0, at: float = 1.0) -> Task:
    return Task(
        id=task_id,
        status=TaskStatus.PENDING,
        audio_path="a",
        video_path="v",
        max_attempts=3,
        created_at=at,
        enqueued_at=at,
        updated_at=at,
        priority=priority,
        options={"pn": 1},
    )


@pytest.fixture
def store(tmp_path: Path) -> TaskStore:
    return TaskStore(tmp_path / "tasks.sqlite3")


def test_a_task_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "tasks.sqlite3"
    first = TaskStore(path)
    first.insert(make_task("t1"))
    first.transition(
        "t1", TaskStatus.PROCESSING, node="a", node_job_id="t1.1", attempt_log=[{"node": "x"}]
    )
    first.close()
    again = TaskStore(path).get("t1")
    assert again is not None
    assert again.status is TaskStatus.PROCESSING and again.node == "a"
    assert again.options == {"pn": 1} and again.attempt_log == [{"node": "x"}]


def test_queue_order_is_priority_then_fifo(store: TaskStore) -> None:
    store.insert(make_task("old-low", 0, at=1))
    store.insert(make_task("new-high", 5, at=3))
    store.insert(make_task("new-low", 0, at=2))
    store.insert(make_task("same-time", 0, at=2))
    assert [t.id for t in store.queued()] == ["new-high", "old-low", "new-low", "same-time"]


def test_transition_refuses_what_the_state_machine_refuses(store: TaskStore) -> None:
    store.insert(make_task("t"))
    assert store.transition("t", TaskStatus.COMPLETED) is None  # pending cannot complete
    assert store.transition("t", TaskStatus.PROCESSING) is not None
    done = store.transition(
        "t", TaskStatus.COMPLETED, callback=("http://x/hook", {"task_id": "t"}, 5.0)
    )
    assert done is not None and done.status is TaskStatus.COMPLETED
    # Terminal: a second ending (a late cancel) changes nothing and queues no callback.
    assert store.transition("t", TaskStatus.CANCELLED, callback=("http://x", {}, 5.0)) is None
    assert [c.body for c in store.due_callbacks(now=10.0)] == [{"task_id": "t"}]


def test_callback_outbox_retries_then_gives_up(store: TaskStore) -> None:
    store.insert(make_task("t"))
    store.transition("t", TaskStatus.CANCELLED, callback=("http://x", {"a": 1}, 0.0))
    [cb] = store.due_callbacks(now=1.0)
    store.callback_failed(cb.id, "HTTP 503", next_attempt_at=50.0, now=1.0)
    assert store.due_callbacks(now=10.0) == []
    assert store.next_callback_due() == 50.0
    [cb] = store.due_callbacks(now=60.0)
    assert cb.attempts == 1
    store.callback_failed(cb.id, "HTTP 503", next_attempt_at=None, now=60.0)
    assert store.due_callbacks(now=1e9) == [] and store.next_callback_due() is None
    assert store.callbacks_for("t")[0]["last_error"] == "HTTP 503"


def test_idempotency_key_and_listing(store: TaskStore) -> None:
    keyed = make_task("k")
    keyed.idempotency_key = "key-1"
    store.insert(keyed)
    store.insert(make_task("other", at=5))
    found = store.by_idempotency_key("key-1")
    assert found is not None and found.id == "k"
    tasks, total = store.page(since=2.0)
    assert total == 1 and [t.id for t in tasks] == ["other"]
    assert set(store.get_many(["k", "nope"])) == {"k"}
