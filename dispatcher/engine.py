"""The engine: moves tasks from the queue onto nodes and follows them to the end.

One coroutine per running task (a worker: ``attempt.Attempt``) drives its attempt on a node:
upload, follow progress, fetch the result. Decisions are made elsewhere by plain functions
(which node: ``scheduler``; retry or fail: ``states.decide_retry``); this module keeps the
books. The store is written before anything else is done or told.

Slots have one source of truth: ``leases`` (task id -> node and job). A lease is taken when a
task is handed to a node and given back when its attempt ends, so the in-flight count is
derived, never counted up and down, and cannot drift.

Shutdown leaves node jobs running: workers are cancelled without touching the store or the
node, and the next start re-attaches to every task the store says is processing.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import structlog

from dispatcher import scheduler
from dispatcher.attempt import Attempt
from dispatcher.fleet import Fleet, Health, NodeRuntime, ejection_cooldown
from dispatcher.node_client import NodeClient, NodeError
from dispatcher.settings import DispatcherSettings
from dispatcher.states import Outcome, TaskStatus, decide_retry
from dispatcher.store import Task, TaskStore
from heygem_common.aio import cancel_and_wait

log = structlog.get_logger()
Sleep = Callable[[float], Awaitable[None]]
# Sends one progress callback (url, body); failures are the sender's to swallow.
ProgressNotifier = Callable[[str, dict[str, Any]], Awaitable[None]]
QUEUE_VIEW_TTL_S = 1.0
# How long DELETE /tasks/{id} waits for the node to stop the job before answering.
CANCEL_WAIT_S = 2.0


class TaskNotFound(KeyError):
    pass


class TaskStateConflict(Exception):
    """The task's state does not allow what was asked; the message says why."""


@dataclass
class Lease:
    node: str
    job_id: str
    media_seconds: float | None
    started_at: float


def iso(ts: float | None) -> str | None:
    # An ETA can be infinite (no node can take the task): that is "unknown", not a date.
    if ts is None or not math.isfinite(ts):
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat()


def job_id_for(task: Task) -> str:
    # A fresh id per hand-over: a retried task never collides with its old job on a node.
    handed_over = sum(1 for entry in task.attempt_log if entry.get("job_id"))
    return f"{task.id}.{handed_over + 1}"


def current_attempts(attempt_log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The charged attempts since the last explicit retry (the history stays in the log)."""
    retries = [i for i, a in enumerate(attempt_log) if a.get("outcome") == "retried"]
    since = retries[-1] + 1 if retries else 0
    return [a for a in attempt_log[since:] if a.get("counted", True)]


def failure_summary(attempt_log: list[dict[str, Any]]) -> str:
    counted = current_attempts(attempt_log)
    parts = [f"attempt {i} on {a['node']}: {a['error']}" for i, a in enumerate(counted, 1)]
    return f"failed after {len(counted)} attempt(s): " + "; ".join(parts)


class Engine:
    def __init__(
        self,
        settings: DispatcherSettings,
        store: TaskStore,
        fleet: Fleet,
        nodes: NodeClient,
        clock: Callable[[], float] = time.time,
        sleep: Sleep = asyncio.sleep,
        notify_progress: ProgressNotifier | None = None,
    ) -> None:
        self.settings = settings
        self.notify_progress = notify_progress
        self.store = store
        self.fleet = fleet
        self.nodes = nodes
        self.clock = clock
        self.sleep = sleep
        self.leases: dict[str, Lease] = {}
        self.workers: dict[str, asyncio.Task[None]] = {}
        self.wake = asyncio.Event()
        self.callbacks_wake = asyncio.Event()
        self._terminal_events: dict[str, set[asyncio.Event]] = {}
        self._last_choice: str | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._queue_view_cache: tuple[float, object, dict[str, tuple[int, float]]] | None = None

    # -- start and stop ---------------------------------------------------------------
    def recover(self) -> None:
        """Re-attach to every task that was on a node when the dispatcher last stopped."""
        for task in self.store.with_status(TaskStatus.PROCESSING):
            if task.node not in self.fleet.nodes or task.node_job_id is None:
                self._requeue_orphan(task)
                continue
            lease = Lease(
                task.node,
                task.node_job_id,
                task.media_seconds,
                task.attempt_started_at or self.clock(),
            )
            self.leases[task.id] = lease
            self._spawn_worker(task.id)
            log.info("re-attached", task_id=task.id, node=task.node, stage=task.stage)
        self._remove_stray_files()
        self.wake.set()

    def _requeue_orphan(self, task: Task) -> None:
        self.store.transition(
            task.id,
            TaskStatus.PENDING,
            node=None,
            node_job_id=None,
            stage="queued",
            message=f"node {task.node} is no longer in machines.json; queued again",
            attempts=max(0, task.attempts - 1),
            updated_at=self.clock(),
        )

    def _remove_stray_files(self) -> None:
        """Uploads whose task row was never written (a crash mid-submit), half downloads."""
        known = self.store.all_ids()
        if self.settings.uploads_dir.is_dir():
            for folder in self.settings.uploads_dir.iterdir():
                if folder.name not in known:
                    shutil.rmtree(folder, ignore_errors=True)
        if self.settings.results_dir.is_dir():
            for partial in self.settings.results_dir.glob("*.part"):
                partial.unlink(missing_ok=True)

    async def stop(self) -> None:
        for worker in list(self.workers.values()):
            worker.cancel()
        for worker in list(self.workers.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        for task in list(self._background):
            task.cancel()

    def in_background(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- the queue ----------------------------------------------------------------------
    def submit(self, task: Task) -> Task:
        self.store.insert(task)
        log.info("task queued", task_id=task.id, priority=task.priority)
        self.wake.set()
        return task

    async def dispatch_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                # The timeout catches expiry deadlines and nodes that come back on their own.
                await asyncio.wait_for(self.wake.wait(), timeout=1.0)
            self.wake.clear()
            try:
                self.dispatch_ready()
            except Exception:
                log.exception("dispatch round failed")

    def dispatch_ready(self) -> None:
        """Hand queued tasks to nodes until the head of the queue has to wait."""
        queue = self._drop_expired(self.store.queued())
        demands = [scheduler.TaskDemand(t.media_seconds) for t in queue]
        for i, head in enumerate(queue):
            behind = demands[i + 1 : i + 1 + scheduler.LOOKAHEAD_TASKS]
            node = scheduler.choose_node(
                self._snapshots_for(head),
                demands[i],
                self.settings.policy,
                self._last_choice,
                queued_behind=behind,
            )
            if node is None:
                return
            self._last_choice = node
            self._hand_over(head, node)

    def _drop_expired(self, queue: list[Task]) -> list[Task]:
        now = self.clock()
        alive = []
        for task in queue:
            # Expiry is about starting in time: a task that started once and went back to
            # the queue after a node failure is owed its remaining attempts.
            if task.expires_at is not None and task.started_at is None and now >= task.expires_at:
                waited = now - task.created_at
                self.finish(
                    task.id,
                    TaskStatus.FAILED,
                    f"expired: not started within its expiry ({waited:.0f}s waited)",
                )
            else:
                alive.append(task)
        return alive

    def in_flight(self) -> dict[str, int]:
        """Slots used per node: our leases plus running jobs the node has that we do not."""
        counts: dict[str, int] = {}
        ours = {lease.job_id for lease in self.leases.values()}
        for lease in self.leases.values():
            counts[lease.node] = counts.get(lease.node, 0) + 1
        for node in self.fleet.nodes.values():
            strangers = [j for j in node.reported_running() if j not in ours]
            counts[node.name] = counts.get(node.name, 0) + len(strangers)
        return counts

    def busy_until(self) -> dict[str, tuple[float, ...]]:
        """Estimated seconds until each task we lease finishes, per node."""
        now = self.clock()
        speeds = self._effective_speeds()
        result: dict[str, list[float]] = {}
        for lease in self.leases.values():
            remaining = scheduler.estimate_remaining(
                lease.media_seconds, speeds.get(lease.node), now - lease.started_at
            )
            result.setdefault(lease.node, []).append(remaining)
        return {name: tuple(sorted(times)) for name, times in result.items()}

    def _effective_speeds(self) -> dict[str, float]:
        # Unmeasured nodes are assumed to run at the fleet's median speed.
        bare = self.fleet.snapshots({}, {})
        return dict(zip([s.name for s in bare], scheduler.effective_speeds(bare), strict=True))

    def snapshots(self) -> list[scheduler.NodeSnapshot]:
        return self.fleet.snapshots(self.in_flight(), self.busy_until())

    def _snapshots_for(self, task: Task) -> list[scheduler.NodeSnapshot]:
        """Nodes that already failed this task are avoided while another node can take it."""
        snapshots = self.snapshots()
        failed_on = {a["node"] for a in current_attempts(task.attempt_log)}
        # Only a node that can start the task now counts as an alternative: a failed node
        # is better than an idle one while the others are full.
        others = [
            s for s in snapshots if s.accepting and s.free_slots > 0 and s.name not in failed_on
        ]
        if not failed_on or not others:
            return snapshots
        return [
            s
            if s.name not in failed_on
            else scheduler.NodeSnapshot(
                s.name, s.max_concurrent, s.in_flight, False, s.speed, s.busy_until
            )
            for s in snapshots
        ]

    def queue_view(self) -> dict[str, tuple[int, float]]:
        """Queue position (1-based) and expected completion time of every queued task.

        Simulating the queue costs O(queue x nodes); status polls within a second share it.
        """
        now = self.clock()
        key = (self.store.queue_fingerprint(), frozenset(self.leases))
        cached = self._queue_view_cache
        if cached is not None and cached[1] == key and now - cached[0] < QUEUE_VIEW_TTL_S:
            return cached[2]
        queue = self.store.queued()
        etas = scheduler.estimate_etas(
            self.snapshots(),
            [scheduler.TaskDemand(t.media_seconds) for t in queue],
            self.settings.policy,
            self._last_choice,
        )
        pairs = zip(queue, etas, strict=True)
        view = {task.id: (i + 1, now + eta) for i, (task, eta) in enumerate(pairs)}
        self._queue_view_cache = (now, key, view)
        return view

    def running_eta(self, task: Task) -> float | None:
        lease = self.leases.get(task.id)
        if lease is None:
            return None
        now = self.clock()
        return now + scheduler.estimate_remaining(
            lease.media_seconds, self._effective_speeds().get(lease.node), now - lease.started_at
        )

    # -- one attempt on one node ----------------------------------------------------------
    def _hand_over(self, task: Task, node: str) -> None:
        now = self.clock()
        job_id = job_id_for(task)
        updated = self.store.transition(
            task.id,
            TaskStatus.PROCESSING,
            node=node,
            node_job_id=job_id,
            stage="uploading",
            attempts=task.attempts + 1,
            started_at=task.started_at or now,
            attempt_started_at=now,
            last_progress_at=now,
            progress=0.0,
            message=f"uploading to {node}",
            updated_at=now,
        )
        if updated is None:  # cancelled between the read and now
            return
        self.leases[task.id] = Lease(node, job_id, task.media_seconds, now)
        log.info("task handed over", task_id=task.id, node=node, job_id=job_id)
        self._spawn_worker(task.id)

    def _spawn_worker(self, task_id: str) -> None:
        self.workers[task_id] = asyncio.create_task(Attempt(self, task_id).run())

    # -- endings --------------------------------------------------------------------------
    def attempt_ended(
        self, task_id: str, outcome: Outcome, message: str, blame_node: bool = True
    ) -> None:
        lease = self.leases.get(task_id)
        task = self.store.get(task_id)
        if lease is None or task is None or task.status is not TaskStatus.PROCESSING:
            return
        node = self.fleet.nodes.get(lease.node)
        decision = decide_retry(outcome, task.attempts, task.max_attempts)
        entry = self._log_entry(lease, outcome.value, message, decision.count_attempt)
        attempt_log = [*task.attempt_log, entry]
        attempts = task.attempts if decision.count_attempt else task.attempts - 1
        log.warning(
            "attempt ended",
            task_id=task_id,
            node=lease.node,
            outcome=outcome.value,
            error=message,
            requeue=decision.requeue,
        )
        if decision.requeue:
            self.store.transition(
                task_id,
                TaskStatus.PENDING,
                node=None,
                node_job_id=None,
                stage="queued",
                progress=0.0,
                message=f"queued again after: {message}",
                attempts=attempts,
                attempt_log=attempt_log,
                updated_at=self.clock(),
            )
        else:
            self.finish(
                task_id,
                TaskStatus.FAILED,
                failure_summary(attempt_log),
                attempt_log=attempt_log,
                attempts=attempts,
            )
        if node is not None and blame_node and outcome is not Outcome.NOT_STARTED:
            self._count_failure(node)
        self.release(task_id)
        if node is not None:
            # Until the DELETE lands, a stalled job still holds its slot on the node.
            node.assume_running(lease.job_id)
            self.in_background(self.forget_job(node, lease.job_id))

    def _log_entry(
        self, lease: Lease | None, outcome: str, error: str, counted: bool
    ) -> dict[str, Any]:
        return {
            "node": lease.node if lease else None,
            "job_id": lease.job_id if lease else None,
            "outcome": outcome,
            "error": error,
            "at": iso(self.clock()),
            "counted": counted,
        }

    def _count_failure(self, node: NodeRuntime) -> None:
        node.jobs_failed += 1
        node.job_failures_in_row += 1
        if node.job_failures_in_row >= self.settings.eject_after_failures:
            node.ejections += 1
            cooldown = ejection_cooldown(node.ejections, self.settings.eject_base_s)
            node.ejected_until = self.clock() + cooldown
            node.job_failures_in_row = 0
            node.last_error = f"ejected for {cooldown:.0f}s after repeated job failures"
            log.warning("node ejected", node=node.name, cooldown_s=cooldown)

    def mark_unreachable(self, node: NodeRuntime, message: str) -> None:
        # Passive detection: do not hand the next task to a node that just refused us.
        node.health = Health.UNHEALTHY
        node.probe_successes = 0
        node.last_error = message

    def release(self, task_id: str) -> None:
        lease = self.leases.pop(task_id, None)
        if lease is not None and lease.node in self.fleet.nodes:
            self.fleet.nodes[lease.node].forget_reported(lease.job_id)
        self.wake.set()

    async def forget_job(self, node: NodeRuntime, job_id: str) -> None:
        try:
            await self.nodes.delete(node.config, job_id)
            node.forget_reported(job_id)
            self.wake.set()
        except NodeError as exc:
            # The health loop deletes jobs nobody owns, so this is retried later.
            log.info(
                "could not delete job on node yet", node=node.name, job_id=job_id, error=exc.message
            )

    def finish(
        self, task_id: str, status: TaskStatus, error: str | None, **values: Any
    ) -> Task | None:
        """Enter a terminal state; the callback is queued in the same transaction."""
        now = self.clock()
        task = self.store.get(task_id)
        if task is None:
            return None
        message = {TaskStatus.COMPLETED: "completed", TaskStatus.CANCELLED: "cancelled"}.get(
            status, error or "failed"
        )
        callback = None
        if task.callback_url:
            body = self.callback_body(replace(task, **values), status, now, error)
            callback = (task.callback_url, body, now)
        done = self.store.transition(
            task_id,
            status,
            callback=callback,
            completed_at=now,
            updated_at=now,
            error_message=error,
            message=message,
            **{"stage": status.value, **values},
        )
        if done is not None:
            log.info("task finished", task_id=task_id, status=status.value, error=error)
            self.callbacks_wake.set()
            for event in self._terminal_events.pop(task_id, set()):
                event.set()
        return done

    def callback_body(
        self, task: Task, status: TaskStatus, now: float, error: str | None
    ) -> dict[str, Any]:
        result_url = None
        if status is TaskStatus.COMPLETED:
            result_url = f"{self.settings.public_url.rstrip('/')}/tasks/{task.id}/result"
        return {
            "task_id": task.id,
            "status": status.value,
            "completed_at": iso(now),
            "error_message": error,
            "description": task.description,
            "result_url": result_url,
            "attempts": task.attempts,
            "node": task.node,
        }

    # -- user control ---------------------------------------------------------------------
    def get(self, task_id: str) -> Task:
        task = self.store.get(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        return task

    async def cancel(self, task_id: str) -> Task:
        task = self.get(task_id)
        if task.status.terminal:
            raise TaskStateConflict(f"task {task_id} is already {task.status.value}")
        lease = self.leases.get(task_id)
        values: dict[str, Any] = {}
        if lease is not None:  # logged, so that a retry never reuses this job id
            values["attempt_log"] = [
                *task.attempt_log,
                self._log_entry(lease, "cancelled", "cancelled by user", counted=False),
            ]
        done = self.finish(task_id, TaskStatus.CANCELLED, "cancelled by user", **values)
        if done is None:
            raise TaskStateConflict(f"task {task_id} is already {self.get(task_id).status}")
        worker = self.workers.pop(task_id, None)
        if worker is not None:
            await cancel_and_wait(worker)
            self._remove_result_files(task_id)  # a download it may have been in the middle of
        if lease is not None and self.leases.get(task_id) is lease:
            self.release(task_id)
        if lease is not None and lease.node in self.fleet.nodes:
            # Right after the release, with no await between: the slot is never free early.
            await self._cancel_on_node(self.fleet.nodes[lease.node], lease.job_id)
        return done

    async def _cancel_on_node(self, node: NodeRuntime, job_id: str) -> None:
        """Stop the job on its node, waiting briefly so the slot is free when we answer.

        A node that does not answer soon is not waited for: its slot counts as taken until
        the DELETE lands (or the next health report says otherwise).
        """
        node.assume_running(job_id)
        forget = asyncio.ensure_future(self.forget_job(node, job_id))
        self._background.add(forget)
        forget.add_done_callback(self._background.discard)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(forget), CANCEL_WAIT_S)

    def _remove_result_files(self, task_id: str) -> None:
        for name in (f"{task_id}.mp4", f"{task_id}.mp4.part"):
            (self.settings.results_dir / name).unlink(missing_ok=True)

    def retry(self, task_id: str) -> Task:
        task = self.get(task_id)
        if task.status not in (TaskStatus.FAILED, TaskStatus.CANCELLED):
            raise TaskStateConflict(
                f"only failed or cancelled tasks can be retried; {task_id} is {task.status}"
            )
        if task.files_expired:
            raise TaskStateConflict(
                f"the inputs of {task_id} were deleted by retention; submit it again"
            )
        now = self.clock()
        marker = self._log_entry(None, "retried", "queued again by user", counted=False)
        updated = self.store.transition(
            task_id,
            TaskStatus.PENDING,
            attempts=0,
            error_message=None,
            completed_at=None,
            attempt_log=[*task.attempt_log, marker],
            stage="queued",
            progress=0.0,
            message="queued again by user",
            enqueued_at=now,
            node=None,
            node_job_id=None,
            updated_at=now,
            expires_at=None,
        )
        if updated is None:
            raise TaskStateConflict(f"task {task_id} changed state; try again")
        self.wake.set()
        return updated

    async def wait_terminal(self, task_id: str, timeout_s: float) -> Task:
        task = self.get(task_id)
        if task.status.terminal:
            return task
        event = asyncio.Event()  # one per waiter: two sync requests may wait on one task
        waiters = self._terminal_events.setdefault(task_id, set())
        waiters.add(event)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout_s)
        finally:
            waiters.discard(event)
            if not waiters:  # timed out or the client left: keep nothing behind
                self._terminal_events.pop(task_id, None)
        return self.get(task_id)
