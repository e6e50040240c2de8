"""One attempt of one task on one node: upload, follow progress, fetch the result.

The engine hands a task to a node and starts an ``Attempt``; the attempt does the I/O and
tells the engine how it ended (``attempt_ended``) or finishes the task (``finish``). How an
attempt ends is read from the node client's errors:

    NodeFull, a busy model        not started: no attempt charged, the node backs off
    NodeUnreachable               node failed, and it is marked unhealthy at once
    JobUnknown, NodeRejected      node failed
    stall, task timeout           node failed (the engine deletes the job on the node)
    the job failed, a bad video   job failed
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from dispatcher import scheduler
from dispatcher.node_client import JobUnknown, NodeFull, NodeRejected, NodeUnreachable
from dispatcher.states import Outcome, TaskStatus
from dispatcher.store import Task
from heygem_common.media import NotMedia, require_video

if TYPE_CHECKING:
    from dispatcher.engine import Engine

log = structlog.get_logger()
# Progress callbacks go out each time progress has moved this many points.
PROGRESS_CALLBACK_STEP = 10.0
# After a 409 (or a busy model) a node gets no new work for this long.
REFUSED_BACKOFF_S = 2.0
# The longest a status poll waits at the node for the job to move.
LONG_POLL_S = 10.0
# A result that cannot be written (our disk is full) is fetched again after this long.
DISK_RETRY_S = 30.0


class AttemptEnded(Exception):
    def __init__(self, outcome: Outcome, message: str) -> None:
        super().__init__(message)
        self.outcome, self.message = outcome, message


class Attempt:
    """One task's attempt on the node it was handed to; ``run`` is the worker coroutine."""

    def __init__(self, engine: Engine, task_id: str) -> None:
        self.engine = engine
        self.task_id = task_id
        self.lease = engine.leases[task_id]
        self.node = engine.fleet.nodes[self.lease.node]

    async def run(self) -> None:
        engine, task_id, node = self.engine, self.task_id, self.node
        structlog.contextvars.bind_contextvars(task_id=task_id, node=node.name)
        try:
            task = engine.get(task_id)
            if task.stage == "uploading":
                await self._upload(task)
            if task.stage != "fetching":
                await self._follow()
            await self._fetch()
        except AttemptEnded as ended:
            if ended.outcome is Outcome.NOT_STARTED:  # the model was busy: treat like a 409
                node.refused_until = engine.clock() + REFUSED_BACKOFF_S
            engine.attempt_ended(task_id, ended.outcome, ended.message)
        except NodeFull as exc:
            node.refused_until = engine.clock() + REFUSED_BACKOFF_S
            engine.attempt_ended(task_id, Outcome.NOT_STARTED, exc.message)
        except NodeUnreachable as exc:
            engine.mark_unreachable(node, exc.message)
            engine.attempt_ended(task_id, Outcome.NODE_FAILED, exc.message)
        except (JobUnknown, NodeRejected) as exc:
            engine.attempt_ended(task_id, Outcome.NODE_FAILED, exc.message)
        except asyncio.CancelledError:
            raise  # shutdown or user cancel: whoever cancelled keeps the books
        except Exception as exc:
            log.exception("worker crashed")
            engine.attempt_ended(
                task_id, Outcome.NODE_FAILED, f"dispatcher error: {exc!r}", blame_node=False
            )
        finally:
            if engine.workers.get(task_id) is asyncio.current_task():
                del engine.workers[task_id]

    async def _upload(self, task: Task) -> None:
        engine, node = self.engine, self.node
        await engine.nodes.submit(
            node.config,
            self.lease.job_id,
            Path(task.audio_path),
            Path(task.video_path),
            task.options,
        )
        engine.store.update(
            task.id, stage="running", message=f"running on {node.name}", updated_at=engine.clock()
        )

    async def _follow(self) -> None:
        engine, task_id, node, lease = self.engine, self.task_id, self.node, self.lease
        task = engine.get(task_id)
        stall_s = task.stall_timeout_s or engine.settings.stall_timeout_s
        limit_s = task.task_timeout_s or engine.settings.task_timeout_s
        progress, message = task.progress, task.message
        reported = progress  # what the last progress callback said
        last_change = engine.clock()
        # Long polls: the node answers when the job moves, so its end is seen at once.
        wait_s = min(LONG_POLL_S, stall_s / 2)
        seen: tuple[str, float] | None = None
        while True:
            info = await engine.nodes.job(node.config, lease.job_id, wait_s=wait_s, seen=seen)
            now = engine.clock()
            state = info.get("state")
            new_progress = float(info.get("progress") or 0.0)
            new_message = str(info.get("message") or "")
            unchanged = seen == (state, new_progress)
            seen = (str(state), new_progress)
            if new_progress > progress:
                last_change = now
            if (new_progress, new_message) != (progress, message):
                progress, message = max(progress, new_progress), new_message
                # By steps, not every poll: at most ~10 progress callbacks per attempt.
                # Not on the poll that says "succeeded": the terminal callback follows, and
                # a late progress one must not look newer than it.
                if state == "running" and progress >= min(100.0, reported + PROGRESS_CALLBACK_STEP):
                    self._send_progress(task, progress, message)
                    reported = progress
                engine.store.update(
                    task_id,
                    progress=progress,
                    message=message,
                    last_progress_at=last_change,
                    updated_at=now,
                )
            if state == "succeeded":
                return
            _raise_if_job_ended(state, info, node.name)
            if now - last_change > stall_s:
                raise AttemptEnded(
                    Outcome.NODE_FAILED,
                    f"stalled: no progress for {stall_s:.0f}s at {progress:.0f}%",
                )
            if now - lease.started_at > limit_s:
                raise AttemptEnded(Outcome.NODE_FAILED, f"timed out after {limit_s:.0f}s")
            # Ask again at once only after news from a node that long-polls; otherwise pace.
            if unchanged or not info.get("long_poll"):
                await engine.sleep(engine.settings.poll_interval_s)

    def _send_progress(self, task: Task, progress: float, message: str) -> None:
        notify = self.engine.notify_progress
        if not (task.progress_callbacks and task.callback_url and notify):
            return
        body = {
            "task_id": task.id,
            "status": TaskStatus.PROCESSING.value,
            "progress": round(progress, 1),
            "message": message,
            "node": task.node,
            "completed_at": None,
            "error_message": None,
            "description": task.description,
        }
        self.engine.in_background(notify(task.callback_url, body))

    async def _fetch(self) -> None:
        engine, task_id, node, lease = self.engine, self.task_id, self.node, self.lease
        engine.store.update(
            task_id,
            stage="fetching",
            message=f"downloading result from {node.name}",
            updated_at=engine.clock(),
        )
        dest = engine.settings.results_dir / f"{task_id}.mp4"
        size = await self._download(dest)
        try:
            await asyncio.to_thread(require_video, dest, "the result")
        except NotMedia as exc:
            dest.unlink(missing_ok=True)
            raise AttemptEnded(
                Outcome.JOB_FAILED, f"{node.name} returned a bad video: {exc}"
            ) from exc
        done = engine.finish(
            task_id,
            TaskStatus.COMPLETED,
            None,
            result_path=str(dest),
            result_size=size,
            progress=100.0,
            stage="done",
        )
        if done is None:  # cancelled while we downloaded
            dest.unlink(missing_ok=True)
        self._learn_speed()
        node.jobs_done += 1
        node.job_failures_in_row = 0
        engine.release(task_id)
        engine.in_background(engine.forget_job(node, lease.job_id))

    async def _download(self, dest: Path) -> int:
        """Fetch the result; our own disk failing is retried, never blamed on the node."""
        engine = self.engine
        while True:
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                return await engine.nodes.fetch_result(self.node.config, self.lease.job_id, dest)
            except OSError as exc:  # the result is safe on the node meanwhile
                message = (
                    f"cannot store the result on the dispatcher ({exc.strerror or exc});"
                    f" retrying in {DISK_RETRY_S:.0f}s"
                )
                log.error("result not stored", task_id=self.task_id, error=str(exc))
                engine.store.update(self.task_id, message=message, updated_at=engine.clock())
                await engine.sleep(DISK_RETRY_S)

    def _learn_speed(self) -> None:
        lease = self.lease
        elapsed = self.engine.clock() - lease.started_at
        observed = scheduler.observed_speed(elapsed, lease.media_seconds)
        if observed is not None:
            self.node.speed = scheduler.update_speed(self.node.speed, observed)


def _raise_if_job_ended(state: object, info: dict[str, Any], node: str) -> None:
    if state == "failed":
        error = str(info.get("error") or "no error message")
        if info.get("error_kind") == "busy":
            raise AttemptEnded(Outcome.NOT_STARTED, f"model on {node} was busy: {error}")
        raise AttemptEnded(Outcome.JOB_FAILED, f"job failed on {node}: {error}")
    if state == "cancelled":
        raise AttemptEnded(Outcome.NODE_FAILED, f"the job was cancelled on {node}")
    if state not in ("running", "receiving"):
        raise AttemptEnded(Outcome.NODE_FAILED, f"{node} reported an unknown state {state!r}")
