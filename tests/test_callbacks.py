"""Callback delivery against receivers that misbehave (respx stands in for them)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import respx

from dispatcher.background import callback_backoff, deliver_due_callbacks
from dispatcher.engine import Engine
from dispatcher.fleet import Fleet
from dispatcher.node_client import NodeClient
from dispatcher.settings import DispatcherSettings
from dispatcher.states import TaskStatus
from dispatcher.store import Task, TaskStore

pytestmark = pytest.mark.anyio
HOOK = "http://receiver.test/hook"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def engine(tmp_path: Path, clock: Clock) -> Engine:
    settings = DispatcherSettings(data_dir=tmp_path, callback_max_attempts=3)
    store = TaskStore(settings.db_path)
    engine = Engine(
        settings, store, Fleet(clock=clock), NodeClient(httpx.AsyncClient()), clock=clock
    )
    task = Task(
        id="t1",
        status=TaskStatus.PENDING,
        audio_path="a",
        video_path="v",
        max_attempts=3,
        created_at=1.0,
        enqueued_at=1.0,
        updated_at=1.0,
        callback_url=HOOK,
    )
    store.insert(task)
    engine.finish("t1", TaskStatus.FAILED, "broke")  # queues the terminal callback
    return engine


@pytest.mark.parametrize(("attempt", "wait"), [(1, 2), (2, 4), (5, 32), (20, 600)])
def test_backoff(attempt: int, wait: float) -> None:
    assert callback_backoff(attempt) == wait


@respx.mock
async def test_a_failing_receiver_gets_the_callback_later(engine: Engine, clock: Clock) -> None:
    route = respx.post(HOOK).mock(
        side_effect=[httpx.Response(503), httpx.ConnectError("down"), httpx.Response(200)]
    )
    async with httpx.AsyncClient() as client:
        await deliver_due_callbacks(engine, client)
        assert engine.store.callbacks_for("t1")[0]["last_error"] == "HTTP 503"
        await deliver_due_callbacks(engine, client)  # not due yet: nothing sent
        assert route.call_count == 1
        clock.now += 2
        await deliver_due_callbacks(engine, client)
        assert "ConnectError" in engine.store.callbacks_for("t1")[0]["last_error"]
        clock.now += 4
        await deliver_due_callbacks(engine, client)
    [row] = engine.store.callbacks_for("t1")
    assert row["delivered_at"] == clock.now and row["attempts"] == 3
    body = route.calls[-1].request.content
    assert b'"status":"failed"' in body and b'"error_message":"broke"' in body


@respx.mock
async def test_a_receiver_that_never_answers_is_given_up_on(engine: Engine, clock: Clock) -> None:
    respx.post(HOOK).mock(side_effect=httpx.ReadTimeout("slow"))
    async with httpx.AsyncClient() as client:
        for _ in range(5):
            await deliver_due_callbacks(engine, client)
            clock.now += 1000
    [row] = engine.store.callbacks_for("t1")
    assert row["attempts"] == 3 and row["gave_up_at"] is not None and row["delivered_at"] is None
    assert engine.store.next_callback_due() is None
