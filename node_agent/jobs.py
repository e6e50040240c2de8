"""Jobs on one node: slots, state, cancellation and what survives a node restart.

The node never runs more than ``max_concurrent`` jobs: a slot is taken when a job is
*reserved* (before its upload is read, so a full node answers 409 without swallowing a
video first) and given back when the job ends. Each job lives in ``jobs/<id>/`` with a
``job.json``; a finished job's result survives a restart of the agent so the dispatcher can
still fetch it, while a job that was running when the agent died is gone (its process died
with it) and the dispatcher sends the task elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog

from heygem_common.aio import cancel_and_wait
from node_agent.backends.base import Backend, BackendBusy, BackendError, JobSpec

log = structlog.get_logger()

JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# After the model said "busy" (HeyGem 10001) the node refuses new jobs for this long.
BUSY_BACKOFF_S = 5.0


class JobState(StrEnum):
    RECEIVING = "receiving"  # slot reserved, upload being read
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def holds_slot(self) -> bool:
        return self in (JobState.RECEIVING, JobState.RUNNING)


class NoFreeSlot(Exception):
    pass


class UnknownJob(KeyError):
    pass


class JobExists(Exception):
    """The id is taken: a second job under it would run beside the first, unseen."""


@dataclass
class Job:
    job_id: str
    state: JobState
    created_at: float
    options: dict[str, Any] = field(default_factory=dict)
    progress: float = 0.0
    message: str = "receiving upload"
    error: str | None = None
    # "busy": the model refused it and nothing ran, so a retry costs the task nothing.
    error_kind: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    result_size: int | None = None
    # What the model said about the result beyond the file (HeyGem: cost, duration, size).
    backend_result: dict[str, Any] | None = None

    def public(self) -> dict[str, Any]:
        return asdict(self)


class JobManager:
    def __init__(
        self,
        backend: Backend,
        data_dir: Path,
        max_concurrent: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.root = data_dir / "jobs"
        self.max_concurrent = max_concurrent
        self.clock = clock
        self.jobs: dict[str, Job] = {}
        self.peak_running = 0
        self.jobs_done = 0
        self.jobs_failed = 0
        self.busy_until = 0.0
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._change_events: dict[str, asyncio.Event] = {}

    # -- queries ----------------------------------------------------------------------
    def running_ids(self) -> list[str]:
        return [j.job_id for j in self.jobs.values() if j.state.holds_slot]

    @property
    def free_slots(self) -> int:
        return max(0, self.max_concurrent - len(self.running_ids()))

    def model_busy(self) -> bool:
        return self.clock() < self.busy_until

    def get(self, job_id: str) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise UnknownJob(job_id) from None

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def result_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "result.mp4"

    # -- lifecycle --------------------------------------------------------------------
    def reserve(self, job_id: str, options: Mapping[str, Any]) -> Job:
        """Take a slot for a new job; the caller then fills its folder and calls start()."""
        if job_id in self.jobs:
            raise JobExists(job_id)
        if self.free_slots == 0 or self.model_busy():
            raise NoFreeSlot(job_id)
        job = Job(job_id, JobState.RECEIVING, self.clock(), options=dict(options))
        self.job_dir(job_id).mkdir(parents=True, exist_ok=True)
        self.jobs[job_id] = job
        self.peak_running = max(self.peak_running, len(self.running_ids()))
        return job

    def abandon(self, job_id: str) -> None:
        """The upload failed: give the slot back and leave nothing behind."""
        self.jobs.pop(job_id, None)
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def start(self, job: Job, audio: Path, video: Path) -> None:
        spec = JobSpec(
            job_id=job.job_id,
            audio=audio,
            video=video,
            output=self.result_path(job.job_id),
            workdir=self.job_dir(job.job_id) / "work",
            options=job.options,
        )
        spec.workdir.mkdir(exist_ok=True)
        job.state = JobState.RUNNING
        job.started_at = self.clock()
        job.message = "starting"
        self._tasks[job.job_id] = asyncio.create_task(self._run(job, spec))

    async def _run(self, job: Job, spec: JobSpec) -> None:
        structlog.contextvars.bind_contextvars(job_id=job.job_id)

        def report(percent: float, message: str) -> None:
            before = job.progress
            job.progress = round(max(job.progress, min(percent, 100.0)), 1)
            job.message = message
            if job.progress != before:
                self._changed(job.job_id)

        try:
            await self.backend.run(spec, report)
            self._finish_ok(job, spec)
        except asyncio.CancelledError:
            self._finish(job, JobState.CANCELLED, "cancelled")
            raise
        except BackendBusy as exc:
            self.busy_until = self.clock() + BUSY_BACKOFF_S
            self._finish(job, JobState.FAILED, exc.message, kind="busy")
        except BackendError as exc:
            self._finish(job, JobState.FAILED, exc.message, kind="backend")
        except Exception as exc:  # a bug in a backend must not kill the agent
            log.exception("backend crashed")
            self._finish(job, JobState.FAILED, f"backend crashed: {exc!r}", kind="crash")
        finally:
            self._tasks.pop(job.job_id, None)
            shutil.rmtree(spec.workdir, ignore_errors=True)

    def _finish_ok(self, job: Job, spec: JobSpec) -> None:
        if not spec.output.is_file() or spec.output.stat().st_size == 0:
            self._finish(job, JobState.FAILED, "backend reported success but wrote no output")
            return
        job.result_size = spec.output.stat().st_size
        job.backend_result = _read_backend_result(spec.workdir / "backend_result.json")
        job.progress = 100.0
        self._finish(job, JobState.SUCCEEDED, "done")
        # Inputs are no longer needed once the result exists; keep only what is fetched.
        for child in self.job_dir(job.job_id).iterdir():
            if child.name not in ("result.mp4", "job.json"):
                _remove(child)

    def _finish(self, job: Job, state: JobState, message: str, kind: str | None = None) -> None:
        job.state = state
        job.finished_at = self.clock()
        job.message = message
        if state is JobState.FAILED:
            job.error, job.error_kind = message, kind or "backend"
            self.jobs_failed += 1
        elif state is JobState.SUCCEEDED:
            self.jobs_done += 1
        log.info("job finished", state=state.value, message=message)
        self._save(job)
        self._changed(job.job_id)

    # -- long polling ---------------------------------------------------------------------
    def _changed(self, job_id: str) -> None:
        """Wake everyone waiting for this job's progress or state to move."""
        event = self._change_events.pop(job_id, None)
        if event is not None:
            event.set()

    async def wait_for_change(self, job_id: str, timeout_s: float) -> None:
        """Return when the job's progress or state moves, or after ``timeout_s``.

        The dispatcher learns that a job ended within milliseconds instead of at its next
        poll, so the slot is handed to the next task at once.
        """
        event = self._change_events.setdefault(job_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)

    async def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        task = self._tasks.get(job_id)
        if task is not None:
            await cancel_and_wait(task)
            if job.state.holds_slot:  # cancelled before its first step: _run never ran
                self._tasks.pop(job_id, None)
                self._finish(job, JobState.CANCELLED, "cancelled")
        return job

    async def forget(self, job_id: str) -> None:
        """Cancel if running, then delete the job and all its files."""
        await self.cancel(job_id)
        self.jobs.pop(job_id, None)
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    async def shutdown(self) -> None:
        for job_id in list(self._tasks):
            await self.cancel(job_id)

    # -- persistence ------------------------------------------------------------------
    def _save(self, job: Job) -> None:
        path = self.job_dir(job.job_id) / "job.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(job.public()))
        os.replace(tmp, path)

    def restore(self) -> None:
        """Keep finished results from before a restart; clear what died mid-run."""
        self.root.mkdir(parents=True, exist_ok=True)
        for folder in self.root.iterdir():
            job = _load_finished(folder)
            if job is None:
                if folder.is_dir():
                    self.backend.adopt_leftover(folder.name, folder / "work")
                _remove(folder)
            else:
                self.jobs[job.job_id] = job

    def sweep(self, retention_s: float) -> list[str]:
        """Delete finished jobs nobody fetched within ``retention_s``."""
        cutoff = self.clock() - retention_s
        stale = [
            j.job_id
            for j in self.jobs.values()
            if not j.state.holds_slot and (j.finished_at or j.created_at) < cutoff
        ]
        for job_id in stale:
            self.jobs.pop(job_id, None)
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        return stale


def _load_finished(folder: Path) -> Job | None:
    try:
        raw = json.loads((folder / "job.json").read_text())
        job = Job(**{**raw, "state": JobState(raw["state"])})
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if job.state is JobState.SUCCEEDED and not (folder / "result.mp4").is_file():
        return None
    return None if job.state.holds_slot else job


def _read_backend_result(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
