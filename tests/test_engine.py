"""The engine against a scripted in-memory fleet: no HTTP, no real time.

Every test builds an ``Engine`` over a real SQLite store, a real ``Fleet`` and a
``FakeNodes`` whose jobs follow a script (succeed, hang at 20 %, fail, lose the job...).
The engine's clock and sleep are a ``FakeClock``: minutes of stalls and timeouts pass in
milliseconds. Tests drive the engine the way ``dispatch_forever`` does, with
``dispatch_ready()`` rounds, and read the outcome from the store and the calls the fake
fleet recorded.
"""

from __future__ import annotations

import asyncio
import errno
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest
from structlog.testing import capture_logs

import dispatcher.attempt as attempt_module
import dispatcher.engine as engine_module
from dispatcher.attempt import REFUSED_BACKOFF_S
from dispatcher.background import delete_orphans, probe_node
from dispatcher.engine import (
    Engine,
    ProgressNotifier,
    TaskStateConflict,
    iso,
)
from dispatcher.fleet import Fleet, Health, parse_machines
from dispatcher.node_client import NodeClient
from dispatcher.scheduler import Policy
from dispatcher.settings import DispatcherSettings
from dispatcher.states import TaskStatus
from dispatcher.store import Task, TaskStore
from heygem_common.media import probe
from tests.fakes import (
    Behaviour,
    FakeClock,
    FakeNode,
    FakeNodes,
    bad_result,
    busy,
    crawls,
    fails,
    full,
    hangs_at,
    loses_job,
    make_sample_mp4,
    succeeds,
)

pytestmark = pytest.mark.anyio

HOOK = "http://receiver.test/hook"


@pytest.fixture(scope="session")
def sample_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sample_mp4(tmp_path_factory.mktemp("media") / "sample.mp4")


@dataclass
class Rig:
    """One engine, its store and fleet, the fake nodes behind it and the fake clock."""

    engine: Engine
    nodes: FakeNodes
    clock: FakeClock
    settings: DispatcherSettings
    inputs: Path

    @property
    def store(self) -> TaskStore:
        return self.engine.store

    @property
    def fleet(self) -> Fleet:
        return self.engine.fleet

    def add_node(self, name: str, max_concurrent: int = 1, **script: Any) -> FakeNode:
        node = self.nodes.add(name, max_concurrent, **script)
        self.apply()
        return node

    def apply(self, enabled: dict[str, bool] | None = None) -> None:
        self.fleet.apply(parse_machines(self.nodes.machines_json(enabled)))

    def submit(self, task_id: str, **fields: Any) -> Task:
        now = self.clock()
        fields.setdefault("max_attempts", self.settings.max_attempts)
        task = Task(id=task_id, status=TaskStatus.PENDING, audio_path=str(self.inputs),
                    video_path=str(self.inputs), created_at=now, enqueued_at=now,
                    updated_at=now, **fields)  # fmt: skip
        return self.engine.submit(task)

    def task(self, task_id: str) -> Task:
        task = self.store.get(task_id)
        assert task is not None, task_id
        return task

    def status(self, *task_ids: str) -> list[TaskStatus]:
        return [self.task(t).status for t in task_ids]

    def quiet(self) -> bool:
        # The engine's background DELETEs are part of what a test waits for.
        return not self.engine.workers and not self.engine._background

    async def settle(self, task_ids: Iterable[str] | None = None, limit_s: float = 3.0) -> None:
        """Dispatch rounds until the tasks (default: all) are terminal and nothing runs.

        While nothing runs (so nothing sleeps), the fake clock moves one second a round,
        as ``dispatch_forever`` wakes up every second: back-offs and cool-downs pass.
        """
        ids = list(task_ids) if task_ids is not None else sorted(self.store.all_ids())
        deadline = time.monotonic() + limit_s
        while True:
            self.engine.dispatch_ready()
            await asyncio.sleep(0)
            if self.quiet():
                if all(s.terminal for s in self.status(*ids)):
                    return
                self.clock.advance(1.0)
            if time.monotonic() > deadline:
                states = {t: (self.task(t).status.value, self.task(t).message) for t in ids}
                raise AssertionError(f"not settled after {limit_s}s: {states}")

    async def steps(self, n: int) -> None:
        """Let running workers take ``n`` turns (one poll each) without dispatching."""
        for _ in range(n):
            await asyncio.sleep(0)

    async def stop(self) -> None:
        await self.engine.stop()
        for _ in range(3):  # let cancelled background DELETEs unwind
            await asyncio.sleep(0)

    def restart(self) -> Rig:
        """A new dispatcher process over the same data dir: new store handle, new fleet."""
        store = TaskStore(self.settings.db_path)
        fleet = Fleet(clock=self.clock)
        engine = Engine(self.settings, store, fleet, cast(NodeClient, self.nodes),
                        clock=self.clock, sleep=self.clock.sleep)  # fmt: skip
        rig = Rig(engine, self.nodes, self.clock, self.settings, self.inputs)
        rig.apply()
        return rig


MakeRig = Callable[..., Rig]


@pytest.fixture
async def make_rig(tmp_path: Path, sample_mp4: Path) -> AsyncIterator[MakeRig]:
    rigs: list[Rig] = []
    inputs = tmp_path / "inputs" / "media.mp4"
    inputs.parent.mkdir()
    shutil.copyfile(sample_mp4, inputs)

    def make(notify_progress: ProgressNotifier | None = None, **overrides: Any) -> Rig:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "machines": tmp_path / "machines.json",
            "policy": Policy.LEAST_LOADED,
            "max_attempts": 3,
            "poll_interval_s": 1.0,
            "stall_timeout_s": 5.0,
            "task_timeout_s": 600.0,
            "eject_after_failures": 100,  # only the ejection tests want ejections
            "public_url": "http://dispatcher.test",
            **overrides,
        }
        settings = DispatcherSettings(**values)
        clock = FakeClock()
        nodes = FakeNodes(clock, sample_mp4)
        engine = Engine(settings, TaskStore(settings.db_path), Fleet(clock=clock),
                        cast(NodeClient, nodes),  # a hand-written fake of its interface
                        clock=clock, sleep=clock.sleep,
                        notify_progress=notify_progress)  # fmt: skip
        rig = Rig(engine, nodes, clock, settings, inputs)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        await rig.stop()
        rig.store.close()


# -- spreading work ---------------------------------------------------------------------------
@pytest.mark.parametrize("policy", list(Policy))
async def test_tasks_spread_over_the_nodes_never_above_max_concurrent(
    make_rig: MakeRig, policy: Policy
) -> None:
    rig = make_rig(policy=policy)
    limits = {"a": 2, "b": 1, "c": 3}
    for name, limit in limits.items():
        rig.add_node(name, limit, default=succeeds(polls=4))
    ids = [f"t{i:02}" for i in range(12)]
    for task_id in ids:
        rig.submit(task_id)

    rig.engine.dispatch_ready()
    assert rig.engine.in_flight() == limits  # every slot filled in one round
    assert rig.status(*ids).count(TaskStatus.PENDING) == 6

    await rig.settle()
    assert rig.status(*ids) == [TaskStatus.COMPLETED] * 12
    assert {n: node.peak_running for n, node in rig.nodes.nodes.items()} == limits
    assert rig.nodes.refusals() == 0  # the engine never sent a node more than it can take
    assert all(rig.task(t).attempts == 1 for t in ids)
    assert rig.engine.leases == {} and set(rig.engine.in_flight().values()) == {0}
    result = Path(str(rig.task("t00").result_path))
    assert probe(result).video_streams == 1 and rig.task("t00").result_size == result.stat().st_size


async def test_tasks_start_by_priority_then_in_arrival_order(make_rig: MakeRig) -> None:
    rig = make_rig()
    rig.add_node("only", 1)
    for task_id, priority in [("low-1", 0), ("low-2", 0), ("high", 5), ("low-3", 0), ("mid", 2)]:
        rig.submit(task_id, priority=priority)
        rig.clock.advance(1)

    await rig.settle()
    assert rig.nodes.submitted() == ["high.1", "mid.1", "low-1.1", "low-2.1", "low-3.1"]


async def test_a_requeued_task_keeps_its_place_at_the_head_of_the_queue(make_rig: MakeRig) -> None:
    rig = make_rig()
    rig.add_node("only", 1, script=[loses_job(after=1)])
    rig.submit("first")
    rig.clock.advance(1)
    rig.submit("second")

    await rig.settle()
    assert rig.nodes.submitted() == ["first.1", "first.2", "second.1"]


# -- node failures ----------------------------------------------------------------------------
async def test_a_node_refusing_connections_sends_the_task_to_another_node(
    make_rig: MakeRig,
) -> None:
    rig = make_rig()
    rig.add_node("a").down = True
    rig.add_node("b")
    rig.submit("t")

    await rig.settle()
    task = rig.task("t")
    assert task.status is TaskStatus.COMPLETED and task.node == "b"
    assert task.attempts == 2
    first = task.attempt_log[0]
    assert first["node"] == "a" and first["outcome"] == "node_failed" and first["counted"]
    assert "connection refused" in first["error"]
    node_a = rig.fleet.nodes["a"]
    assert node_a.health is Health.UNHEALTHY and "connection refused" in node_a.last_error

    rig.submit("next")  # an unhealthy node gets no new work
    await rig.settle()
    assert rig.nodes.submitted("a") == ["t.1"] and rig.task("next").node == "b"


async def test_when_attempts_run_out_the_error_names_every_node_and_error(
    make_rig: MakeRig,
) -> None:
    rig = make_rig(max_attempts=3)
    rig.add_node("a", default=fails("CUDA out of memory"))
    rig.add_node("b", default=fails("no face found"))
    rig.submit("t", callback_url=HOOK)

    await rig.settle()
    task = rig.task("t")
    assert task.status is TaskStatus.FAILED and task.attempts == 3
    assert task.error_message == (
        "failed after 3 attempt(s): "
        "attempt 1 on a: job failed on a: CUDA out of memory; "
        "attempt 2 on b: job failed on b: no face found; "
        "attempt 3 on a: job failed on a: CUDA out of memory"
    )
    assert rig.nodes.submitted() == ["t.1", "t.2", "t.3"]
    assert sorted(rig.nodes.deleted()) == ["t.1", "t.2", "t.3"]  # nothing left on the nodes
    [callback] = rig.store.due_callbacks(rig.clock())
    assert callback.body["status"] == "failed"
    assert callback.body["error_message"] == task.error_message


@pytest.mark.parametrize("refusal", [full, busy])
async def test_a_full_node_or_a_busy_model_costs_no_attempt(
    make_rig: MakeRig, refusal: Callable[[], Behaviour]
) -> None:
    rig = make_rig(max_attempts=1, eject_after_failures=1)
    rig.add_node("only", script=[refusal(), refusal()])
    rig.submit("t")

    await rig.settle()
    task = rig.task("t")
    assert task.status is TaskStatus.COMPLETED and task.attempts == 1
    assert [(a["outcome"], a["counted"]) for a in task.attempt_log] == [("not_started", False)] * 2
    assert rig.nodes.submitted() == ["t.1", "t.2", "t.3"]
    node = rig.fleet.nodes["only"]
    assert node.jobs_failed == 0 and node.ejected_until == 0.0  # not the node's fault


@pytest.mark.parametrize("refusal", [full(), busy()], ids=["409-full", "model-busy"])
async def test_a_node_that_refused_gets_no_work_for_a_while(
    make_rig: MakeRig, refusal: Behaviour
) -> None:
    rig = make_rig()
    rig.add_node("only", script=[refusal])
    rig.submit("t")

    await rig.settle()
    first, second = rig.nodes.calls_of("submit")
    assert second.at - first.at >= REFUSED_BACKOFF_S


async def test_a_job_hanging_at_20_percent_is_stalled_deleted_and_retried_elsewhere(
    make_rig: MakeRig,
) -> None:
    rig = make_rig(stall_timeout_s=300.0, poll_interval_s=5.0)
    rig.add_node("a", script=[hangs_at(20)])
    rig.add_node("b")
    rig.submit("t")

    await rig.settle()
    task = rig.task("t")
    assert task.status is TaskStatus.COMPLETED and task.node == "b" and task.attempts == 2
    assert task.attempt_log[0]["error"] == "stalled: no progress for 300s at 20%"
    assert rig.nodes.deleted("a") == ["t.1"] and rig.nodes.nodes["a"].jobs == {}
    submitted, deleted = rig.nodes.calls_of("submit", "a")[0], rig.nodes.calls_of("delete", "a")[0]
    assert 300 < deleted.at - submitted.at <= 300 + 2 * 5.0  # detected within a poll or two


async def test_a_stalled_job_holds_its_slot_until_the_node_has_deleted_it(
    make_rig: MakeRig,
) -> None:
    # One slot: the retry can only go where the hung job still runs until DELETE lands.
    rig = make_rig(stall_timeout_s=30.0)
    node = rig.add_node("a", 1, script=[hangs_at(20)])
    node.delete_latency_turns = 5
    rig.submit("t")

    await rig.settle()
    assert rig.task("t").status is TaskStatus.COMPLETED and rig.task("t").attempts == 2
    assert rig.nodes.refusals() == 0  # never sent the retry into a slot still taken


async def test_a_task_stall_timeout_overrides_the_setting(make_rig: MakeRig) -> None:
    rig = make_rig(stall_timeout_s=600.0)
    rig.add_node("a", default=hangs_at(20))
    rig.submit("t", stall_timeout_s=30.0, max_attempts=1)

    await rig.settle()
    assert rig.task("t").error_message == (
        "failed after 1 attempt(s): attempt 1 on a: stalled: no progress for 30s at 20%"
    )
    started_at = rig.task("t").started_at
    assert started_at is not None and rig.clock() - started_at < 40


@pytest.mark.parametrize(("setting", "own", "expected"), [(60.0, None, 60), (600.0, 20.0, 20)])
async def test_a_job_that_crawls_past_the_task_timeout_is_ended_and_retried(
    make_rig: MakeRig, setting: float, own: float | None, expected: int
) -> None:
    rig = make_rig(task_timeout_s=setting, stall_timeout_s=5.0)
    rig.add_node("a", script=[crawls(step=0.5)])  # always some progress: never stalls
    rig.add_node("b")
    rig.submit("t", task_timeout_s=own)

    await rig.settle()
    task = rig.task("t")
    assert task.status is TaskStatus.COMPLETED and task.node == "b"
    assert task.attempt_log[0]["error"] == f"timed out after {expected}s"
    assert rig.nodes.deleted("a") == ["t.1"]


async def test_a_job_the_node_forgets_mid_run_is_queued_again(make_rig: MakeRig) -> None:
    rig = make_rig()
    rig.add_node("a", script=[loses_job(after=2)])
    rig.add_node("b")
    rig.submit("t")

    await rig.settle()
    task = rig.task("t")
    assert task.status is TaskStatus.COMPLETED and task.node == "b" and task.attempts == 2
    assert task.attempt_log[0]["outcome"] == "node_failed"
    assert "does not know the job" in task.attempt_log[0]["error"]
    assert rig.fleet.nodes["a"].health is not Health.UNHEALTHY  # it answered: it is up


async def test_a_result_that_is_not_a_video_fails_the_attempt(make_rig: MakeRig) -> None:
    rig = make_rig()
    rig.add_node("a", script=[bad_result()])
    rig.add_node("b")
    rig.submit("t")

    await rig.settle()
    task = rig.task("t")
    assert task.status is TaskStatus.COMPLETED and task.node == "b"
    assert task.attempt_log[0]["outcome"] == "job_failed"
    assert task.attempt_log[0]["error"].startswith("a returned a bad video")
    assert probe(Path(str(task.result_path))).video_streams == 1


async def test_a_node_removed_from_the_file_finishes_its_task_and_takes_no_more(
    make_rig: MakeRig,
) -> None:
    rig = make_rig()
    rig.add_node("a", 2, default=succeeds(polls=6))
    rig.add_node("b", 2)
    rig.submit("on-a")
    rig.engine.dispatch_ready()
    await rig.steps(2)
    machines = json.loads(rig.nodes.machines_json())
    machines["machines"] = [m for m in machines["machines"] if m["name"] != "a"]
    rig.fleet.apply(parse_machines(json.dumps(machines)))
    assert rig.fleet.nodes["a"].state_label(rig.clock()) == "draining"

    rig.submit("later-1")
    rig.submit("later-2")
    await rig.settle()
    assert rig.status("on-a", "later-1", "later-2") == [TaskStatus.COMPLETED] * 3
    assert rig.nodes.submitted("a") == ["on-a.1"] and rig.task("on-a").node == "a"


async def test_a_disabled_node_gets_no_work(make_rig: MakeRig) -> None:
    rig = make_rig()
    rig.add_node("a", 2)
    rig.add_node("b", 1)
    rig.apply(enabled={"a": False})
    rig.submit("t1")
    rig.submit("t2")

    rig.engine.dispatch_ready()
    assert rig.status("t1", "t2") == [TaskStatus.PROCESSING, TaskStatus.PENDING]
    assert rig.task("t1").node == "b"


async def test_a_fleet_that_misbehaves_in_every_way_loses_no_task_and_leaks_no_job(
    make_rig: MakeRig,
) -> None:
    rig = make_rig(max_attempts=3, stall_timeout_s=20.0, task_timeout_s=120.0)
    rig.add_node("a", 2, script=[hangs_at(20), succeeds(), busy(), fails("oom"), crawls()])
    rig.add_node("b", 1, script=[loses_job(after=3), full(), succeeds(5), bad_result()])
    rig.add_node("c", 3, script=[fails("x"), fails("y"), hangs_at(20), succeeds(2), busy()])
    ids = [f"t{i:02}" for i in range(15)]
    for task_id in ids:
        rig.submit(task_id)
    rig.engine.dispatch_ready()
    await rig.steps(5)
    await rig.engine.cancel("t14")

    await rig.settle(limit_s=4.0)
    statuses = rig.status(*ids)
    assert all(s.terminal for s in statuses)
    assert statuses.count(TaskStatus.COMPLETED) >= 12 and statuses[-1] is TaskStatus.CANCELLED
    assert rig.nodes.refusals() == 0  # the engine never sent a node more than it can take
    assert all(n.peak_running <= n.max_concurrent for n in rig.nodes.nodes.values())
    assert {n: node.jobs for n, node in rig.nodes.nodes.items()} == {"a": {}, "b": {}, "c": {}}
    assert rig.engine.leases == {} and rig.engine.workers == {}
    for task_id in ids:
        task = rig.task(task_id)
        counted = [a for a in task.attempt_log if a["counted"]]
        assert task.attempts == len(counted) + (task.status is TaskStatus.COMPLETED)


# -- passive ejection -------------------------------------------------------------------------
async def test_a_node_failing_job_after_job_is_ejected_then_comes_back(make_rig: MakeRig) -> None:
    rig = make_rig(eject_after_failures=2, eject_base_s=30.0, max_attempts=1)
    rig.add_node("a", script=[fails("boom"), fails("boom")])
    rig.submit("t1")
    await rig.settle()
    node = rig.fleet.nodes["a"]
    assert node.job_failures_in_row == 1 and node.accepting(rig.clock())

    with capture_logs() as logs:
        rig.submit("t2")
        await rig.settle()
    assert rig.clock() < node.ejected_until <= rig.clock() + 30.0 and node.ejections == 1
    assert node.state_label(rig.clock()) == "ejected" and "ejected for 30s" in node.last_error
    assert any(e["event"] == "node ejected" and e["node"] == "a" for e in logs)

    rig.submit("t3")
    rig.engine.dispatch_ready()
    assert rig.status("t3") == [TaskStatus.PENDING]  # no work during the cool-down
    rig.clock.advance(30.0)
    await rig.settle()
    assert rig.status("t3") == [TaskStatus.COMPLETED]
    assert node.job_failures_in_row == 0 and node.jobs_done == 1


# -- user control ------------------------------------------------------------------------------
async def test_cancelling_a_queued_task_touches_no_node(make_rig: MakeRig) -> None:
    rig = make_rig()
    rig.add_node("a")
    rig.submit("t", callback_url=HOOK)

    cancelled = await rig.engine.cancel("t")
    assert cancelled.status is TaskStatus.CANCELLED
    assert cancelled.error_message == "cancelled by user"
    rig.engine.dispatch_ready()
    assert rig.nodes.calls == []
    with pytest.raises(TaskStateConflict):
        await rig.engine.cancel("t")
    [callback] = rig.store.due_callbacks(rig.clock())
    assert callback.body["status"] == "cancelled"


async def test_cancelling_a_running_task_frees_its_slot_for_the_next_one_at_once(
    make_rig: MakeRig,
) -> None:
    rig = make_rig()
    rig.add_node("a", 1, default=hangs_at(20))
    rig.submit("t1")
    rig.submit("t2")
    rig.engine.dispatch_ready()
    await rig.steps(3)
    assert rig.status("t1", "t2") == [TaskStatus.PROCESSING, TaskStatus.PENDING]
    assert rig.nodes.nodes["a"].running() == ["t1.1"]

    await rig.engine.cancel("t1")
    assert rig.status("t1") == [TaskStatus.CANCELLED]
    assert rig.nodes.deleted("a") == ["t1.1"] and rig.nodes.nodes["a"].running() == []
    assert "t1" not in rig.engine.leases and "t1" not in rig.engine.workers

    rig.engine.dispatch_ready()
    t2 = rig.task("t2")
    assert t2.status is TaskStatus.PROCESSING and t2.node == "a"
    await rig.steps(2)
    assert rig.nodes.submitted("a") == ["t1.1", "t2.1"] and rig.nodes.refusals() == 0


async def test_a_cancel_the_node_misses_is_cleaned_up_by_the_orphan_sweep(
    make_rig: MakeRig,
) -> None:
    rig = make_rig()
    node = rig.add_node("a", 1, default=hangs_at(20))
    rig.submit("t")
    rig.engine.dispatch_ready()
    await rig.steps(3)
    node.down = True

    cancelled = await rig.engine.cancel("t")  # a lost DELETE does not fail the cancel
    assert cancelled.status is TaskStatus.CANCELLED and rig.engine.leases == {}
    assert node.running() == ["t.1"]

    node.down = False
    await probe_node(rig.engine, rig.fleet.nodes["a"])
    assert rig.nodes.deleted("a") == ["t.1", "t.1"] and node.jobs == {}


async def test_a_finished_task_cannot_be_cancelled(make_rig: MakeRig) -> None:
    rig = make_rig()
    rig.add_node("a")
    rig.submit("t")
    await rig.settle()
    with pytest.raises(TaskStateConflict, match="already completed"):
        await rig.engine.cancel("t")


async def test_retrying_a_failed_task_starts_over_with_a_new_job(make_rig: MakeRig) -> None:
    rig = make_rig(max_attempts=1)
    rig.add_node("a", script=[fails("boom")])
    rig.submit("t")
    await rig.settle()
    assert rig.status("t") == [TaskStatus.FAILED]

    retried = rig.engine.retry("t")
    assert retried.status is TaskStatus.PENDING and retried.attempts == 0
    assert retried.error_message is None and retried.completed_at is None
    await rig.settle()
    task = rig.task("t")
    assert task.status is TaskStatus.COMPLETED and task.attempts == 1
    assert rig.nodes.submitted() == ["t.1", "t.2"]  # a new job id: no clash with the old job


@pytest.mark.parametrize("state", [TaskStatus.PENDING, TaskStatus.COMPLETED])
async def test_only_failed_or_cancelled_tasks_can_be_retried(
    make_rig: MakeRig, state: TaskStatus
) -> None:
    rig = make_rig()
    rig.add_node("a")
    rig.submit("t")
    if state is TaskStatus.COMPLETED:
        await rig.settle()
    with pytest.raises(TaskStateConflict, match="only failed or cancelled"):
        rig.engine.retry("t")


async def test_retrying_a_task_cancelled_while_running_uses_a_new_job_id(
    make_rig: MakeRig,
) -> None:
    rig = make_rig()
    node = rig.add_node("a", 2, script=[hangs_at(20)])
    rig.submit("t")
    rig.engine.dispatch_ready()
    await rig.steps(3)
    node.down = True  # the cancel's DELETE is lost: the old job stays on the node
    await rig.engine.cancel("t")
    node.down = False

    rig.engine.retry("t")
    rig.engine.dispatch_ready()
    await rig.steps(2)
    # The retry must be a new job: "t.1" is the hung old one, still on the node.
    assert rig.nodes.submitted() == ["t.1", "t.2"] and sorted(node.jobs) == ["t.1", "t.2"]


async def test_a_queued_task_past_its_expiry_fails_and_calls_back(make_rig: MakeRig) -> None:
    rig = make_rig(stall_timeout_s=3600.0)
    rig.add_node("a", 1, default=hangs_at(20))
    rig.submit("blocker")
    rig.submit("doomed", expires_at=rig.clock() + 30, callback_url=HOOK)
    rig.submit("patient")
    start = rig.clock()
    rig.engine.dispatch_ready()
    await rig.steps(2)  # the blocker runs (and its polls move the clock a little)

    rig.clock.now = start + 29
    rig.engine.dispatch_ready()
    assert rig.status("doomed", "patient") == [TaskStatus.PENDING] * 2
    rig.clock.now = start + 31
    rig.engine.dispatch_ready()
    doomed = rig.task("doomed")
    assert doomed.status is TaskStatus.FAILED
    assert doomed.error_message == "expired: not started within its expiry (31s waited)"
    assert rig.status("patient") == [TaskStatus.PENDING]
    [callback] = rig.store.due_callbacks(rig.clock())
    assert callback.task_id == "doomed" and callback.body["status"] == "failed"
    assert rig.nodes.submitted() == ["blocker.1"]


# -- callbacks ---------------------------------------------------------------------------------
async def test_a_completed_task_queues_exactly_one_callback(make_rig: MakeRig) -> None:
    rig = make_rig()
    rig.add_node("a")
    rig.submit("t", callback_url=HOOK, description="hello")
    rig.submit("quiet")  # no callback_url: nothing to call

    rig.engine.dispatch_ready()
    task = await rig.engine.wait_terminal("t", timeout_s=2.0)
    assert task.status is TaskStatus.COMPLETED
    await rig.settle()
    with pytest.raises(TaskStateConflict):
        await rig.engine.cancel("t")

    [callback] = rig.store.due_callbacks(rig.clock())
    assert callback.task_id == "t" and callback.url == HOOK
    assert callback.body == {
        "task_id": "t",
        "status": "completed",
        "completed_at": iso(task.completed_at),
        "error_message": None,
        "description": "hello",
        "result_url": "http://dispatcher.test/tasks/t/result",
        "attempts": 1,
        "node": "a",
    }
    assert rig.store.callbacks_for("quiet") == []


async def test_progress_callbacks_go_out_while_the_job_runs_for_tasks_that_ask(
    make_rig: MakeRig,
) -> None:
    sent: list[tuple[str, dict[str, Any]]] = []

    async def notify(url: str, body: dict[str, Any]) -> None:
        sent.append((url, body))

    rig = make_rig(notify_progress=notify)
    rig.add_node("a", 2, default=succeeds(polls=5))
    rig.submit("asks", callback_url=HOOK, progress_callbacks=True)
    rig.submit("does-not", callback_url=HOOK)

    await rig.settle()
    assert {url for url, _ in sent} == {HOOK} and {b["task_id"] for _, b in sent} == {"asks"}
    progress = [b["progress"] for _, b in sent]
    assert progress == sorted(progress) and {25.0, 50.0, 75.0} <= set(progress)
    assert all(b["status"] == "processing" and b["node"] == "a" for _, b in sent)
    # The terminal callback is not a progress one: it waits in the store, once.
    assert [c.body["status"] for c in rig.store.due_callbacks(rig.clock())] == ["completed"] * 2


# -- restart and recovery -----------------------------------------------------------------------
def processing(rig: Rig, task_id: str, node: str, stage: str, **fields: Any) -> Task:
    """Put a task in the store as a dispatcher that died mid-attempt left it."""
    rig.submit(task_id, **fields)
    now = rig.clock()
    updated = rig.store.transition(
        task_id, TaskStatus.PROCESSING, node=node, node_job_id=f"{task_id}.1", stage=stage,
        attempts=1, started_at=now - 10, attempt_started_at=now - 10, progress=40.0,
    )  # fmt: skip
    assert updated is not None
    return updated


async def test_recover_follows_a_running_job_without_uploading_again(make_rig: MakeRig) -> None:
    rig = make_rig()
    node = rig.add_node("a")
    processing(rig, "t", "a", "running")
    node.start_job("t.1", succeeds(polls=3), progress=50.0, polls=1)

    rig.engine.recover()
    assert set(rig.engine.leases) == {"t"} and rig.engine.in_flight() == {"a": 1}
    await rig.settle()
    task = rig.task("t")
    assert task.status is TaskStatus.COMPLETED and task.attempts == 1
    assert rig.nodes.submitted() == [] and rig.nodes.calls_of("fetch_result", "a")


@pytest.mark.parametrize("upload_arrived", [False, True])
async def test_recover_uploads_again_when_the_upload_was_cut(
    make_rig: MakeRig, upload_arrived: bool
) -> None:
    rig = make_rig()
    node = rig.add_node("a")
    processing(rig, "t", "a", "uploading")
    if upload_arrived:  # the node got it all; only our "running" write was lost
        node.start_job("t.1", succeeds(polls=2))

    rig.engine.recover()
    await rig.settle()
    assert rig.status("t") == [TaskStatus.COMPLETED] and rig.task("t").attempts == 1
    assert rig.nodes.submitted() == ["t.1"]  # the same job id: idempotent on the node


async def test_recover_fetches_a_result_the_node_finished_while_we_were_down(
    make_rig: MakeRig,
) -> None:
    rig = make_rig()
    node = rig.add_node("a")
    processing(rig, "t", "a", "running")
    node.start_job("t.1", succeeds(), state="succeeded", progress=100.0)

    rig.engine.recover()
    await rig.settle()
    assert rig.status("t") == [TaskStatus.COMPLETED]
    assert [c.method for c in rig.nodes.calls] == ["job", "fetch_result", "delete"]


async def test_recover_queues_again_a_task_whose_node_is_gone(make_rig: MakeRig) -> None:
    rig = make_rig()
    rig.add_node("a")
    processing(rig, "t", "removed-box", "running")

    rig.engine.recover()
    task = rig.task("t")
    assert task.status is TaskStatus.PENDING and task.node is None and task.attempts == 0
    assert "removed-box is no longer in machines.json" in task.message
    await rig.settle()
    assert rig.task("t").node == "a" and rig.task("t").attempts == 1


async def test_recover_removes_stray_uploads_and_partial_results(make_rig: MakeRig) -> None:
    rig = make_rig()
    rig.add_node("a")
    rig.submit("known")
    uploads, results = rig.settings.uploads_dir, rig.settings.results_dir
    for folder in (uploads / "known", uploads / "never-stored", results):
        folder.mkdir(parents=True)
    (results / "x.mp4.part").write_bytes(b"half")
    (results / "done.mp4").write_bytes(b"whole")

    rig.engine.recover()
    assert sorted(p.name for p in uploads.iterdir()) == ["known"]
    assert sorted(p.name for p in results.iterdir()) == ["done.mp4"]


async def test_a_restarted_dispatcher_picks_up_the_job_where_it_was(make_rig: MakeRig) -> None:
    first = make_rig()
    first.add_node("a", default=succeeds(polls=10))
    first.submit("t")
    first.engine.dispatch_ready()
    await first.steps(4)
    await first.stop()  # shutdown leaves the node's job running
    assert first.status("t") == [TaskStatus.PROCESSING]
    assert first.nodes.nodes["a"].running() == ["t.1"]
    first.store.close()

    second = first.restart()
    try:
        second.engine.recover()
        await second.settle()
        assert second.status("t") == [TaskStatus.COMPLETED]
        assert second.nodes.submitted() == ["t.1"] and second.task("t").attempts == 1
    finally:
        await second.stop()
        second.store.close()


# -- the orphan sweep -----------------------------------------------------------------------------
async def test_the_orphan_sweep_deletes_jobs_no_lease_owns_and_keeps_the_rest(
    make_rig: MakeRig,
) -> None:
    rig = make_rig()
    node = rig.add_node("a", 3, default=hangs_at(20))
    rig.submit("mine")
    rig.engine.dispatch_ready()
    await rig.steps(2)
    node.start_job("old.2", hangs_at(20))  # left running by a dispatcher that crashed
    node.start_job("stray.1", succeeds(), state="succeeded", progress=100.0)

    report = await rig.nodes.health(rig.fleet.nodes["a"].config, 1.0)
    await delete_orphans(rig.engine, rig.fleet.nodes["a"], report)
    assert sorted(rig.nodes.deleted("a")) == ["old.2", "stray.1"]
    assert list(node.jobs) == ["mine.1"] and rig.status("mine") == [TaskStatus.PROCESSING]


async def test_probes_mark_a_node_down_then_up_and_sweep_what_it_runs_for_nobody(
    make_rig: MakeRig,
) -> None:
    rig = make_rig(unhealthy_after=2, healthy_after=1)
    node = rig.add_node("a", 2)
    runtime = rig.fleet.nodes["a"]
    node.start_job("someone-elses.1", hangs_at(20))
    node.down = True
    await probe_node(rig.engine, runtime)
    assert runtime.health is Health.UNKNOWN  # one lost probe does not flap a node
    await probe_node(rig.engine, runtime)
    assert runtime.health is Health.UNHEALTHY and not runtime.accepting(rig.clock())

    node.down = False
    await probe_node(rig.engine, runtime)
    assert runtime.health is Health.HEALTHY and runtime.accepting(rig.clock())
    assert rig.nodes.deleted("a") == ["someone-elses.1"] and node.jobs == {}


# -- known bugs ---------------------------------------------------------------------------------
async def test_a_retry_that_lands_while_a_cancel_winds_down_runs_to_the_end(
    make_rig: MakeRig,
) -> None:
    rig = make_rig()
    rig.add_node("a", 1, default=hangs_at(20))
    rig.add_node("b", 1)
    rig.submit("t")
    rig.engine.dispatch_ready()
    await rig.steps(3)

    cancelling = asyncio.ensure_future(rig.engine.cancel("t"))
    await asyncio.sleep(0)  # the task is cancelled; cancel() waits for the old worker
    assert rig.status("t") == [TaskStatus.CANCELLED]
    rig.engine.retry("t")
    rig.engine.dispatch_ready()  # a is still busy with the old job: the retry goes to b
    assert rig.task("t").node == "b"
    await cancelling

    assert rig.engine.leases["t"].node == "b"  # the new attempt still holds its slot
    await rig.settle(limit_s=0.5)
    assert rig.status("t") == [TaskStatus.COMPLETED]
    assert rig.nodes.deleted("a") == ["t.1"]  # the cancel ended the old job, not the new one


async def test_a_free_node_is_not_left_idle_while_tasks_wait(make_rig: MakeRig) -> None:
    rig = make_rig()
    rig.add_node("a", 1, script=[loses_job(after=1)])
    rig.add_node("b", 1, default=hangs_at(20))
    rig.submit("unlucky")
    rig.submit("long")
    rig.engine.dispatch_ready()  # unlucky -> a, long -> b
    await rig.steps(3)  # a loses the job: unlucky is queued again and avoids a
    rig.submit("behind")

    rig.engine.dispatch_ready()
    assert rig.engine.in_flight() == {"a": 1, "b": 1}


async def test_a_slot_freed_by_the_orphan_sweep_is_usable_at_once(make_rig: MakeRig) -> None:
    rig = make_rig()
    node = rig.add_node("a", 1)
    node.start_job("left-over.1", hangs_at(20))
    await probe_node(rig.engine, rig.fleet.nodes["a"])
    assert rig.nodes.deleted("a") == ["left-over.1"] and node.jobs == {}

    rig.submit("t")
    rig.engine.dispatch_ready()
    assert rig.status("t") == [TaskStatus.PROCESSING]


async def test_slow_progress_is_called_back_in_steps_not_every_poll(make_rig: MakeRig) -> None:
    sent: list[float] = []

    async def notify(url: str, body: dict[str, Any]) -> None:
        sent.append(body["progress"])

    rig = make_rig(notify_progress=notify)
    rig.add_node("a", 1, default=crawls(step=3.0))  # +3 points a poll, a new message each
    rig.submit("t", callback_url=HOOK, progress_callbacks=True)
    rig.engine.dispatch_ready()
    await rig.steps(40)
    await rig.engine.cancel("t")
    assert len(sent) >= 5
    assert all(later - earlier >= 10 for earlier, later in zip(sent, sent[1:], strict=False))


# -- found in review: each of these lost work or time before it was fixed --------------------
async def test_expiry_does_not_fail_a_task_that_started_and_went_back_to_the_queue(
    make_rig: MakeRig,
) -> None:
    rig = make_rig()
    rig.add_node("a", script=[loses_job(after=3)])
    rig.add_node("b")
    rig.submit("t", expires_at=rig.clock() + 2)  # starts at once, well within its expiry

    await rig.settle(["t"])
    task = rig.task("t")
    assert task.status is TaskStatus.COMPLETED and task.node == "b" and task.attempts == 2


async def test_our_own_full_disk_is_not_blamed_on_the_node(
    make_rig: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = make_rig(eject_after_failures=1)
    node = rig.add_node("a")
    real_fetch = rig.nodes.fetch_result
    failures = [OSError(errno.ENOSPC, "No space left on device")] * 2

    async def fetch(machine: Any, job_id: str, dest: Path) -> int:
        if failures:
            raise failures.pop()
        return await real_fetch(machine, job_id, dest)

    monkeypatch.setattr(rig.nodes, "fetch_result", fetch)
    rig.submit("t")
    rig.engine.dispatch_ready()
    await rig.steps(20)
    task = rig.task("t")
    assert task.status is TaskStatus.PROCESSING and task.stage == "fetching"
    assert "cannot store the result on the dispatcher (No space left on device)" in task.message

    await rig.settle(["t"])
    task = rig.task("t")
    assert task.status is TaskStatus.COMPLETED and task.attempts == 1  # no GPU run wasted
    runtime = rig.fleet.nodes["a"]
    assert runtime.jobs_failed == 0 and runtime.ejected_until == 0
    assert rig.nodes.submitted() == ["t.1"] and node.jobs == {}


async def test_cancel_while_the_result_is_checked_leaves_no_file(
    make_rig: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = make_rig()
    rig.add_node("a", default=succeeds(polls=2))
    real_check = attempt_module.require_video

    def slow_check(path: Path, what: str) -> Any:
        time.sleep(0.3)  # probing a multi-GB result takes a while
        return real_check(path, what)

    monkeypatch.setattr(attempt_module, "require_video", slow_check)
    rig.submit("t")
    rig.engine.dispatch_ready()
    deadline = time.monotonic() + 5
    while not (rig.settings.results_dir / "t.mp4").exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await rig.engine.cancel("t")
    assert rig.task("t").status is TaskStatus.CANCELLED
    assert list(rig.settings.results_dir.iterdir()) == []


async def test_every_sync_waiter_is_woken_when_the_task_ends(make_rig: MakeRig) -> None:
    rig = make_rig()
    rig.add_node("a", default=hangs_at(20))
    rig.submit("t")
    early = asyncio.create_task(rig.engine.wait_terminal("t", 0.05))
    late = asyncio.create_task(rig.engine.wait_terminal("t", 5.0))
    await early  # the first one gives up: the second must still hear the end
    started = time.monotonic()
    await rig.engine.cancel("t")
    assert (await late).status is TaskStatus.CANCELLED
    assert time.monotonic() - started < 1.0


async def test_cancel_answers_soon_when_the_node_is_slow_and_keeps_its_slot_counted(
    make_rig: MakeRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "CANCEL_WAIT_S", 0.05)
    rig = make_rig()
    rig.add_node("a", 1, default=hangs_at(20))
    rig.submit("t")
    rig.engine.dispatch_ready()
    await rig.steps(3)
    landed = asyncio.Event()
    real_delete = rig.nodes.delete

    async def slow_delete(machine: Any, job_id: str) -> None:
        await landed.wait()  # a node that takes its time to answer
        await real_delete(machine, job_id)

    monkeypatch.setattr(rig.nodes, "delete", slow_delete)
    started = time.monotonic()
    await rig.engine.cancel("t")
    assert time.monotonic() - started < 1.0
    assert rig.engine.in_flight()["a"] == 1  # the job may still run there
    landed.set()
    await rig.steps(3)
    assert rig.engine.in_flight().get("a", 0) == 0
