"""The node's JobManager driven by a scripted backend: slots, outcomes, restarts, sweeps.

``ScriptedBackend`` is a hand-written fake model, not a mock: each job's ``run()`` waits
for the steps its test pushes (report progress, write the output, raise), so a test decides
exactly when and how a job ends. It records every start, every cancellation it saw and the
peak of simultaneous runs, so "never above max_concurrent" is checked from the model's side
too. The same backend drives the HTTP tests in test_node_api.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from structlog.testing import capture_logs

from node_agent.backends.base import (
    Backend,
    BackendBusy,
    BackendError,
    BackendHealth,
    JobSpec,
    ProgressFn,
    record_process_group,
)
from node_agent.jobs import BUSY_BACKOFF_S, Job, JobManager, JobState, NoFreeSlot, UnknownJob
from tests.fakes import FakeClock

# -- the scripted backend ---------------------------------------------------------------------
# One thing a job's run() does when the test releases it; ``None`` in a script ends the run.
Step = Callable[[JobSpec, ProgressFn], None]
RESULT_BYTES = b"\x00\x00\x00\x18ftypmp42 not really a video"


def report(percent: float, message: str = "working") -> Step:
    return lambda spec, progress: progress(percent, message)


def write_output(data: bytes = RESULT_BYTES) -> Step:
    def step(spec: JobSpec, progress: ProgressFn) -> None:
        spec.output.write_bytes(data)

    return step


def fail_with(exc: BaseException) -> Step:
    def step(spec: JobSpec, progress: ProgressFn) -> None:
        raise exc

    return step


class ScriptedBackend(Backend):
    name: ClassVar[str] = "scripted"

    def __init__(self) -> None:
        self.scripts: dict[str, asyncio.Queue[Step | None]] = {}
        self.specs: dict[str, JobSpec] = {}
        self.started: list[str] = []
        self.cancelled: list[str] = []
        self.active: list[str] = []  # a list: two runs of one id must count twice
        self.peak_active = 0
        self.health = BackendHealth(ok=True)
        self.closed = False

    def push(self, job_id: str, *steps: Step | None) -> None:
        script = self.scripts.setdefault(job_id, asyncio.Queue())
        for step in steps:
            script.put_nowait(step)

    def succeed(self, job_id: str, data: bytes = RESULT_BYTES) -> None:
        self.push(job_id, write_output(data), None)

    def fail(self, job_id: str, exc: BaseException) -> None:
        self.push(job_id, fail_with(exc))

    async def run(self, spec: JobSpec, progress: ProgressFn) -> None:
        script = self.scripts.setdefault(spec.job_id, asyncio.Queue())
        self.specs[spec.job_id] = spec
        self.started.append(spec.job_id)
        self.active.append(spec.job_id)
        self.peak_active = max(self.peak_active, len(self.active))
        try:
            while (step := await script.get()) is not None:
                step(spec, progress)
        except asyncio.CancelledError:
            self.cancelled.append(spec.job_id)
            raise
        finally:
            self.active.remove(spec.job_id)
            # A job id used again later (after forget or sweep) starts from a fresh script.
            if self.scripts.get(spec.job_id) is script:
                del self.scripts[spec.job_id]

    async def probe(self) -> BackendHealth:
        return self.health

    async def aclose(self) -> None:
        self.closed = True


# -- helpers ---------------------------------------------------------------------------------
async def until(predicate: Callable[[], object], what: str) -> None:
    # Bounded by wall time, not loop turns: FastAPI runs sync dependencies (the token
    # check) in a thread, so a loaded machine needs real time. The bound turns a hang into
    # a failure that names what never happened.
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"never happened: {what}")


def submit(manager: JobManager, job_id: str) -> Job:
    """What the API does for a good upload: reserve, spool the inputs, start."""
    job = manager.reserve(job_id, {})
    folder = manager.job_dir(job_id)
    (folder / "audio.mp3").write_bytes(b"fake audio")
    (folder / "video.mp4").write_bytes(b"fake video")
    manager.start(job, folder / "audio.mp3", folder / "video.mp4")
    return job


async def settle(manager: JobManager, job_id: str) -> Job:
    job = manager.get(job_id)
    await until(lambda: not job.state.holds_slot, f"job {job_id} to end")
    return job


def _is_job_run(task: asyncio.Task[Any]) -> bool:
    return getattr(task.get_coro(), "__qualname__", "") == "JobManager._run"


async def cancel_stray_runs() -> None:
    """End runs a bug left outside the manager's books, found by their coroutine."""
    runs = [t for t in asyncio.all_tasks() if _is_job_run(t)]
    for task in runs:
        task.cancel()
    await asyncio.gather(*runs, return_exceptions=True)


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.is_dir() else set()


def saved(manager: JobManager, job_id: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((manager.job_dir(job_id) / "job.json").read_text())
    return data


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend()


@pytest.fixture
def manager(tmp_path: Path, backend: ScriptedBackend, clock: FakeClock) -> JobManager:
    return JobManager(backend, tmp_path, max_concurrent=2, clock=clock)


# -- slots -----------------------------------------------------------------------------------
def test_reserve_beyond_max_concurrent_raises_no_free_slot(manager: JobManager) -> None:
    manager.reserve("a", {})
    manager.reserve("b", {})
    assert manager.free_slots == 0
    with pytest.raises(NoFreeSlot):
        manager.reserve("c", {})
    assert not manager.job_dir("c").exists()  # a refused job leaves nothing behind
    assert manager.peak_running == 2


def test_abandon_frees_the_slot_and_removes_the_folder(manager: JobManager) -> None:
    manager.reserve("a", {})
    manager.reserve("b", {})
    (manager.job_dir("a") / "audio.mp3").write_bytes(b"half an upload")
    manager.abandon("a")
    assert manager.free_slots == 1
    assert not manager.job_dir("a").exists()
    with pytest.raises(UnknownJob):
        manager.get("a")
    manager.reserve("c", {})


@pytest.mark.anyio
async def test_a_finished_job_frees_its_slot(manager: JobManager, backend: ScriptedBackend) -> None:
    submit(manager, "a")
    submit(manager, "b")
    with pytest.raises(NoFreeSlot):
        manager.reserve("c", {})
    backend.succeed("a")
    await settle(manager, "a")
    assert manager.free_slots == 1
    assert manager.running_ids() == ["b"]
    submit(manager, "c")
    await manager.shutdown()
    assert backend.peak_active == 2


# -- outcomes --------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_progress_is_monotonic_and_capped(
    manager: JobManager, backend: ScriptedBackend
) -> None:
    job = submit(manager, "a")
    # (reported, expected): never backwards, never above 100, one decimal, NaN ignored.
    for percent, expected in [(30, 30), (10, 30), (55.56, 55.6), (math.nan, 55.6), (250, 100)]:
        message = f"at {percent}"
        backend.push("a", report(percent, message))
        await until(lambda: job.message == message, message)  # noqa: B023 - awaited here
        assert job.progress == expected
    await manager.shutdown()


@pytest.mark.anyio
async def test_success_keeps_only_the_result_and_job_json(
    manager: JobManager, backend: ScriptedBackend, clock: FakeClock
) -> None:
    def write_scratch(spec: JobSpec, progress: ProgressFn) -> None:
        (spec.workdir / "frames.tmp").write_bytes(b"x")
        (spec.workdir / "backend_result.json").write_text('{"cost": 12}')
        (spec.output.parent / "stray.log").write_text("written beside the output")

    submit(manager, "a")
    clock.advance(7)
    backend.push("a", report(40), write_scratch, write_output(), None)
    job = await settle(manager, "a")

    assert job.state is JobState.SUCCEEDED
    assert (job.progress, job.message, job.error) == (100.0, "done", None)
    assert job.result_size == len(RESULT_BYTES)
    assert job.backend_result == {"cost": 12}
    assert job.finished_at == clock()
    assert listing(manager.job_dir("a")) == {"result.mp4", "job.json"}
    assert manager.result_path("a").read_bytes() == RESULT_BYTES
    assert saved(manager, "a") == job.public()
    assert (manager.jobs_done, manager.jobs_failed) == (1, 0)


@pytest.mark.anyio
@pytest.mark.parametrize("output", [None, b""], ids=["no-file", "empty-file"])
async def test_success_without_output_fails_clearly(
    manager: JobManager, backend: ScriptedBackend, output: bytes | None
) -> None:
    submit(manager, "a")
    backend.push("a", *([] if output is None else [write_output(output)]), None)
    job = await settle(manager, "a")
    assert job.state is JobState.FAILED
    assert job.error == "backend reported success but wrote no output"
    assert job.error_kind == "backend"
    assert saved(manager, "a")["state"] == "failed"
    assert manager.free_slots == 2


@pytest.mark.anyio
async def test_backend_error_fails_with_kind_backend(
    manager: JobManager, backend: ScriptedBackend
) -> None:
    submit(manager, "a")
    backend.fail("a", BackendError("the model ran out of GPU memory"))
    job = await settle(manager, "a")
    assert (job.state, job.error_kind) == (JobState.FAILED, "backend")
    assert job.error == job.message == "the model ran out of GPU memory"
    assert not manager.model_busy()  # only a "busy" refusal makes the node back off
    assert manager.jobs_failed == 1
    assert not (manager.job_dir("a") / "work").exists()
    manager.reserve("b", {})


@pytest.mark.anyio
async def test_backend_busy_fails_and_the_node_backs_off(
    manager: JobManager, backend: ScriptedBackend, clock: FakeClock
) -> None:
    submit(manager, "a")
    backend.fail("a", BackendBusy("model is busy (10001)"))
    job = await settle(manager, "a")
    assert (job.state, job.error_kind, job.error) == (
        JobState.FAILED,
        "busy",
        "model is busy (10001)",
    )
    # Slots are free, yet the node refuses work until the model has had time to finish.
    assert manager.free_slots == 2
    with pytest.raises(NoFreeSlot):
        manager.reserve("b", {})
    clock.advance(BUSY_BACKOFF_S - 0.1)
    with pytest.raises(NoFreeSlot):
        manager.reserve("b", {})
    assert not manager.job_dir("b").exists()
    clock.advance(0.2)
    manager.reserve("b", {})


@pytest.mark.anyio
async def test_a_crashing_backend_fails_the_job_and_the_manager_survives(
    manager: JobManager, backend: ScriptedBackend
) -> None:
    submit(manager, "a")
    with capture_logs() as logs:
        backend.fail("a", RuntimeError("segfault in disguise"))
        job = await settle(manager, "a")
    assert (job.state, job.error_kind) == (JobState.FAILED, "crash")
    assert job.error is not None and job.error.startswith("backend crashed")
    assert "segfault in disguise" in job.error
    assert any(entry["event"] == "backend crashed" for entry in logs)
    # The next job runs as if nothing happened.
    submit(manager, "b")
    backend.succeed("b")
    assert (await settle(manager, "b")).state is JobState.SUCCEEDED


# -- cancel and forget -----------------------------------------------------------------------
@pytest.mark.anyio
async def test_cancel_stops_the_backend_and_frees_the_slot(
    manager: JobManager, backend: ScriptedBackend
) -> None:
    submit(manager, "a")
    backend.push("a", report(20))
    await until(lambda: manager.get("a").progress == 20, "progress")
    job = await manager.cancel("a")
    assert (job.state, job.message) == (JobState.CANCELLED, "cancelled")
    assert backend.cancelled == ["a"] and not backend.active
    assert manager.free_slots == 2
    assert listing(manager.job_dir("a")) == {"audio.mp3", "video.mp4", "job.json"}
    assert saved(manager, "a")["state"] == "cancelled"


@pytest.mark.anyio
async def test_cancel_of_a_finished_job_changes_nothing(
    manager: JobManager, backend: ScriptedBackend
) -> None:
    submit(manager, "a")
    backend.succeed("a")
    await settle(manager, "a")
    assert (await manager.cancel("a")).state is JobState.SUCCEEDED
    assert backend.cancelled == []
    with pytest.raises(UnknownJob):
        await manager.cancel("nope")


@pytest.mark.anyio
async def test_cancel_right_after_start_frees_the_slot(
    manager: JobManager, backend: ScriptedBackend
) -> None:
    submit(manager, "a")
    job = await manager.cancel("a")  # no loop turn in between: run() never started
    assert job.state is JobState.CANCELLED
    assert manager.free_slots == 2


@pytest.mark.anyio
async def test_forget_cancels_and_deletes_everything(
    manager: JobManager, backend: ScriptedBackend
) -> None:
    submit(manager, "a")
    submit(manager, "b")
    backend.succeed("b")
    await settle(manager, "b")
    await until(lambda: "a" in backend.active, "a to start")
    await manager.forget("a")
    await manager.forget("b")
    assert backend.cancelled == ["a"]
    assert manager.jobs == {} and manager.free_slots == 2
    assert listing(manager.root) == set()
    with pytest.raises(UnknownJob):
        await manager.forget("a")


@pytest.mark.anyio
async def test_shutdown_cancels_every_running_job(
    manager: JobManager, backend: ScriptedBackend
) -> None:
    submit(manager, "a")
    submit(manager, "b")
    await until(lambda: len(backend.active) == 2, "both to start")
    await manager.shutdown()
    assert sorted(backend.cancelled) == ["a", "b"]
    assert {j.state for j in manager.jobs.values()} == {JobState.CANCELLED}


@pytest.mark.anyio
async def test_reserving_a_running_id_again_never_overcommits(
    tmp_path: Path, backend: ScriptedBackend, clock: FakeClock
) -> None:
    manager = JobManager(backend, tmp_path, max_concurrent=2, clock=clock)
    submit(manager, "a")
    await until(lambda: "a" in backend.active, "a to start")
    with contextlib.suppress(Exception):  # any refusal is fine; running "a" twice is not
        submit(manager, "a")
    submit(manager, "b")
    await until(lambda: "b" in backend.active, "b to start")
    try:
        assert backend.peak_active <= 2
    finally:
        await cancel_stray_runs()


# -- restart and retention -------------------------------------------------------------------
@pytest.mark.anyio
async def test_restore_keeps_finished_results_and_clears_what_died(
    tmp_path: Path, clock: FakeClock
) -> None:
    before = ScriptedBackend()
    first = JobManager(before, tmp_path, max_concurrent=3, clock=clock)
    for job_id in ("done", "broke", "midrun"):
        submit(first, job_id)
    before.succeed("done")
    before.fail("broke", BackendError("bad face"))
    await settle(first, "done")
    await settle(first, "broke")
    # What the disk held at a kill -9 during "midrun": inputs and a workdir, no job.json.
    await until(lambda: "midrun" in before.active, "midrun to start")
    snapshot = tmp_path / "snapshot"
    shutil.copytree(first.job_dir("midrun"), snapshot)
    # The other ways a folder can be left behind, made by hand.
    first.reserve("receiving", {})
    (first.job_dir("receiving") / "audio.mp3").write_bytes(b"half")
    ghost = Job("ghost", JobState.RUNNING, clock()).public()
    (first.root / "ghost").mkdir()
    (first.root / "ghost" / "job.json").write_text(json.dumps(ghost))
    (first.root / "corrupt").mkdir()
    (first.root / "corrupt" / "job.json").write_text("{not json")
    lost = {**first.get("done").public(), "job_id": "lost"}
    (first.root / "lost").mkdir()
    (first.root / "lost" / "job.json").write_text(json.dumps(lost))  # succeeded, no result
    (first.root / "stray.tmp").write_text("")
    await first.shutdown()  # the old process is gone; only its files remain
    shutil.rmtree(first.job_dir("midrun"))
    snapshot.rename(first.job_dir("midrun"))
    assert listing(first.job_dir("midrun")) == {"audio.mp3", "video.mp4", "work"}

    second = JobManager(ScriptedBackend(), tmp_path, max_concurrent=3, clock=clock)
    second.restore()

    assert {i: j.state for i, j in second.jobs.items()} == {
        "done": JobState.SUCCEEDED,
        "broke": JobState.FAILED,
    }
    assert listing(second.root) == {"done", "broke"}
    assert second.result_path("done").read_bytes() == RESULT_BYTES
    assert second.get("done").public() == first.get("done").public()
    assert second.get("broke").error == "bad face"
    assert second.free_slots == 3


@pytest.mark.anyio
async def test_a_graceful_shutdown_leaves_cancelled_jobs_for_the_dispatcher_to_see(
    tmp_path: Path, clock: FakeClock
) -> None:
    first = JobManager(ScriptedBackend(), tmp_path, max_concurrent=1, clock=clock)
    submit(first, "a")
    await until(lambda: first.get("a").state is JobState.RUNNING, "a to run")
    await asyncio.sleep(0)
    await first.shutdown()
    second = JobManager(ScriptedBackend(), tmp_path, max_concurrent=1, clock=clock)
    second.restore()
    # "cancelled" (not a 404) tells the dispatcher the node dropped it: it retries elsewhere.
    assert second.get("a").state is JobState.CANCELLED
    assert second.free_slots == 1


def test_restore_of_an_empty_data_dir_creates_the_jobs_folder(tmp_path: Path) -> None:
    manager = JobManager(ScriptedBackend(), tmp_path / "fresh", max_concurrent=1)
    manager.restore()
    assert manager.root.is_dir() and manager.jobs == {}


@pytest.mark.anyio
async def test_sweep_deletes_old_finished_jobs_only(
    tmp_path: Path, backend: ScriptedBackend, clock: FakeClock
) -> None:
    manager = JobManager(backend, tmp_path, max_concurrent=4, clock=clock)
    for job_id in ("old-ok", "old-failed", "old-running"):
        submit(manager, job_id)
    backend.succeed("old-ok")
    backend.fail("old-failed", BackendError("no"))
    await settle(manager, "old-ok")
    await settle(manager, "old-failed")
    clock.advance(101)
    submit(manager, "new-ok")
    backend.succeed("new-ok")
    await settle(manager, "new-ok")

    assert sorted(manager.sweep(retention_s=100)) == ["old-failed", "old-ok"]
    assert set(manager.jobs) == {"old-running", "new-ok"}  # a long run is never swept
    assert listing(manager.root) == {"old-running", "new-ok"}
    assert manager.sweep(retention_s=100) == []
    await manager.shutdown()


# -- any sequence of calls either works or raises a defined error ----------------------------
IDS = ("a", "b", "c", "d")
MAX_CONCURRENT = 2
RETENTION_S = 100.0
FAILURES: dict[str, tuple[list[Step | None], str]] = {
    "error": ([fail_with(BackendError("model error"))], "backend"),
    "busy": ([fail_with(BackendBusy("model busy"))], "busy"),
    "crash": ([fail_with(RuntimeError("bug"))], "crash"),
    "no-output": ([None], "backend"),
}


class JobManagerMachine(RuleBasedStateMachine):
    """A model of what each job should be, checked against the manager after every call."""

    def __init__(self) -> None:
        super().__init__()
        # JobManager.start() needs a running loop; a private one per run keeps Hypothesis's
        # many examples apart and is closed in teardown so no task outlives its example.
        self.loop = asyncio.new_event_loop()
        self.data_dir = Path(tempfile.mkdtemp(prefix="job-machine-"))
        self.clock = FakeClock()
        self.backend = ScriptedBackend()
        self.manager = JobManager(self.backend, self.data_dir, MAX_CONCURRENT, clock=self.clock)
        self.model: dict[str, JobState] = {}
        self.finished_at: dict[str, float] = {}
        self.busy_until = 0.0

    def run(self, coro: Coroutine[Any, Any, object]) -> None:
        self.loop.run_until_complete(coro)

    def ids(self, *states: JobState) -> list[str]:
        return sorted(i for i, s in self.model.items() if s in states)

    def end(self, job_id: str, state: JobState) -> None:
        self.model[job_id] = state
        self.finished_at[job_id] = self.clock()

    # -- rules ---------------------------------------------------------------------------
    @rule(job_id=st.sampled_from(IDS))
    def reserve(self, job_id: str) -> None:
        if job_id in self.model:
            return  # the API answers a known id itself and never reserves it twice
        full = len(self.ids(JobState.RECEIVING, JobState.RUNNING)) >= MAX_CONCURRENT
        refused = full or self.clock() < self.busy_until
        try:
            self.manager.reserve(job_id, {})
        except NoFreeSlot:
            assert refused, "refused a job with a free slot"
            assert not self.manager.job_dir(job_id).exists()
        else:
            assert not refused, "took a job without a free slot"
            self.model[job_id] = JobState.RECEIVING

    @precondition(lambda self: self.ids(JobState.RECEIVING))
    @rule(data=st.data())
    def start(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(self.ids(JobState.RECEIVING)))

        async def start() -> None:
            submitted = self.manager.get(job_id)
            folder = self.manager.job_dir(job_id)
            (folder / "audio.mp3").write_bytes(b"a")
            (folder / "video.mp4").write_bytes(b"v")
            self.manager.start(submitted, folder / "audio.mp3", folder / "video.mp4")
            await until(lambda: job_id in self.backend.active, f"{job_id} to start")

        self.run(start())
        self.model[job_id] = JobState.RUNNING

    @precondition(lambda self: self.ids(JobState.RECEIVING))
    @rule(data=st.data())
    def abandon(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(self.ids(JobState.RECEIVING)))
        self.manager.abandon(job_id)
        del self.model[job_id]

    @precondition(lambda self: self.ids(JobState.RUNNING))
    @rule(data=st.data(), percent=st.floats(-10, 150, allow_nan=False))
    def progress(self, data: st.DataObject, percent: float) -> None:
        job_id = data.draw(st.sampled_from(self.ids(JobState.RUNNING)))
        job = self.manager.get(job_id)
        expected = round(max(job.progress, min(percent, 100.0)), 1)
        self.backend.push(job_id, report(percent, f"at {percent}"))
        self.run(until(lambda: job.message == f"at {percent}", "progress"))
        assert job.progress == expected

    @precondition(lambda self: self.ids(JobState.RUNNING))
    @rule(data=st.data())
    def succeed(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(self.ids(JobState.RUNNING)))
        self.backend.succeed(job_id)
        self.run(settle(self.manager, job_id))
        self.end(job_id, JobState.SUCCEEDED)
        assert self.manager.result_path(job_id).read_bytes() == RESULT_BYTES

    @precondition(lambda self: self.ids(JobState.RUNNING))
    @rule(data=st.data(), how=st.sampled_from(sorted(FAILURES)))
    def fail(self, data: st.DataObject, how: str) -> None:
        job_id = data.draw(st.sampled_from(self.ids(JobState.RUNNING)))
        steps, kind = FAILURES[how]
        self.backend.push(job_id, *steps)
        with capture_logs():  # a crash logs a traceback; keep the output readable
            self.run(settle(self.manager, job_id))
        self.end(job_id, JobState.FAILED)
        assert self.manager.get(job_id).error_kind == kind
        if how == "busy":
            self.busy_until = self.clock() + BUSY_BACKOFF_S

    @rule(job_id=st.sampled_from(IDS))
    def cancel(self, job_id: str) -> None:
        try:
            self.run(self.manager.cancel(job_id))
        except UnknownJob:
            assert job_id not in self.model
            return
        if self.model[job_id] is JobState.RUNNING:
            self.end(job_id, JobState.CANCELLED)
            assert self.backend.cancelled[-1] == job_id

    @rule(job_id=st.sampled_from(IDS))
    def forget(self, job_id: str) -> None:
        try:
            self.run(self.manager.forget(job_id))
        except UnknownJob:
            assert job_id not in self.model
            return
        del self.model[job_id]
        self.finished_at.pop(job_id, None)

    @rule(seconds=st.sampled_from([0.0, 1.0, BUSY_BACKOFF_S, RETENTION_S]))
    def sweep(self, seconds: float) -> None:
        self.clock.advance(seconds)
        cutoff = self.clock() - RETENTION_S
        stale = {i for i, at in self.finished_at.items() if at < cutoff}
        assert set(self.manager.sweep(RETENTION_S)) == stale
        for job_id in stale:
            del self.model[job_id], self.finished_at[job_id]

    # -- invariants ----------------------------------------------------------------------
    @invariant()
    def slots_are_never_overcommitted(self) -> None:
        running = self.manager.running_ids()
        assert len(running) <= MAX_CONCURRENT
        assert self.manager.peak_running <= MAX_CONCURRENT
        assert self.backend.peak_active <= MAX_CONCURRENT
        assert self.manager.free_slots == MAX_CONCURRENT - len(running)
        assert self.manager.model_busy() == (self.clock() < self.busy_until)

    @invariant()
    def the_manager_agrees_with_the_model(self) -> None:
        assert {i: j.state for i, j in self.manager.jobs.items()} == self.model

    @invariant()
    def every_job_has_its_folder_and_nothing_else_is_left(self) -> None:
        assert listing(self.manager.root) == set(self.model)
        for job_id in self.ids(JobState.SUCCEEDED):
            assert listing(self.manager.job_dir(job_id)) == {"result.mp4", "job.json"}
        for job_id in self.ids(JobState.FAILED, JobState.CANCELLED):
            assert "job.json" in listing(self.manager.job_dir(job_id))

    def teardown(self) -> None:
        try:
            self.run(self.manager.shutdown())
            assert not self.backend.active, "shutdown left a run going"
        finally:
            try:  # after a failed example a run may have escaped the manager's books
                self.run(cancel_stray_runs())
            finally:
                self.loop.close()
                shutil.rmtree(self.data_dir, ignore_errors=True)


JobManagerMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=20, deadline=None
)
TestJobManagerMachine = JobManagerMachine.TestCase


def _leftover_process(workdir: Path, marker: str) -> subprocess.Popen[bytes]:
    """A model process a crashed agent left behind, in its own group, recorded in workdir."""
    workdir.mkdir(parents=True)
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", marker], start_new_session=True
    )
    record_process_group(workdir, process.pid)
    return process


@pytest.mark.parametrize(("marker", "killed"), [("job-9", True), ("someone-else", False)])
def test_restore_kills_what_a_crashed_agent_left_running(
    tmp_path: Path, marker: str, killed: bool
) -> None:
    folder = tmp_path / "jobs" / "job-9"
    process = _leftover_process(folder / "work", marker)
    (folder / "job.json").write_text(json.dumps({"job_id": "job-9", "state": "running"}))
    try:
        JobManager(ScriptedBackend(), tmp_path, max_concurrent=1).restore()
        # Only a process that works on this job (its id in the command line) is ours.
        returncode = process.wait(timeout=5) if killed else process.poll()
        assert (returncode == -signal.SIGKILL) if killed else returncode is None
        assert not folder.exists()
    finally:
        process.kill()
        process.wait()
