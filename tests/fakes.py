"""In-memory stand-ins for the engine's seams: a scripted fleet of nodes and a fake clock.

``FakeNodes`` has the methods of ``NodeClient`` and behaves like a fleet of node agents
(a slot per running job, idempotent ``POST /jobs``, a job forgotten on ``DELETE``), but
every job follows a script chosen by the test, poll by poll. Every call is recorded so a
test can assert what the engine asked for, and each node remembers its peak of running
jobs so "never above max_concurrent" is checked from the node's side.

``FakeClock`` is the engine's clock and ``sleep``: sleeping moves time forward, so stall
and timeout tests cover minutes of fake time in milliseconds of real time.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import imageio_ffmpeg

from dispatcher.fleet import MachineConfig
from dispatcher.node_client import JobUnknown, NodeError, NodeFull, NodeUnreachable

# What one poll of a job answers: the job's public fields, or an error the client raises.
Frame = dict[str, Any] | NodeError
RUNNING_STATES = ("receiving", "running")


def make_sample_mp4(dest: Path) -> Path:
    """A one-second 64x64 H.264 + AAC mp4 from ffmpeg's test sources (a few kB)."""
    command = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", "testsrc=size=64x64:rate=10:duration=1",
        "-f", "lavfi", "-i", "sine=duration=1",
        "-shortest", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(dest),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return dest


# -- a fake clock ---------------------------------------------------------------------------
class FakeClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        # Time moves to the sleeper's deadline, not by its length: workers that sleep
        # side by side share the same fake seconds instead of adding them up.
        deadline = self.now + seconds
        await asyncio.sleep(0)
        self.now = max(self.now, deadline)


# -- scripts: what one job does ---------------------------------------------------------------
@dataclass(frozen=True)
class Behaviour:
    """What a node does with one job: refuse the upload, or answer polls from ``frames``."""

    name: str
    frames: Callable[[int], Frame] = lambda i: _frame("succeeded", 100)
    submit_error: Callable[[str], NodeError] | None = None
    garbage_result: bool = False


def _frame(state: str, progress: float, **extra: Any) -> dict[str, Any]:
    return {"state": state, "progress": progress, "message": f"{state} {progress:.0f}%", **extra}


def succeeds(polls: int = 3) -> Behaviour:
    """Progress 0 -> ... -> 100 over ``polls`` polls, then succeeded (3: 0, 50, done)."""
    last = max(1, polls - 1)

    def frames(i: int) -> Frame:
        if i >= last:
            return _frame("succeeded", 100)
        return _frame("running", round(100 * i / last))

    return Behaviour(f"succeeds after {polls} polls", frames)


def hangs_at(percent: float = 20.0) -> Behaviour:
    """HeyGem's known hang: climbs to ``percent`` and stays there, running, forever."""
    return Behaviour(f"hangs at {percent}%", lambda i: _frame("running", 0 if i == 0 else percent))


def crawls(step: float = 1.0) -> Behaviour:
    """Makes a little progress at every poll and never ends: only a task timeout stops it."""
    return Behaviour("crawls", lambda i: _frame("running", min(99.0, i * step)))


def fails(error: str = "model crashed", after: int = 1, kind: str = "backend") -> Behaviour:
    """Runs for ``after`` polls, then the job is failed with ``error`` (and ``error_kind``)."""

    def frames(i: int) -> Frame:
        if i < after:
            return _frame("running", 10)
        return _frame("failed", 10, error=error, error_kind=kind)

    return Behaviour(f"fails ({kind}): {error}", frames)


def busy() -> Behaviour:
    """The model dropped the job because it was busy (HeyGem 10001): nothing ran."""
    return fails("HeyGem is busy with another task", after=0, kind="busy")


def loses_job(after: int = 1) -> Behaviour:
    """Runs for ``after`` polls, then the node no longer knows the job (it restarted)."""

    def frames(i: int) -> Frame:
        if i < after:
            return _frame("running", 10)
        return JobUnknown("status poll: node does not know the job")

    return Behaviour(f"loses the job after {after} polls", frames)


def full() -> Behaviour:
    """The upload is answered 409: no free slot (what a node says while the model is busy)."""
    return Behaviour("full", submit_error=lambda node: NodeFull(f"upload: {node} is full"))


def unreachable() -> Behaviour:
    """The upload finds nobody listening (one job's worth: see ``FakeNode.down`` for more)."""
    return Behaviour(
        "unreachable",
        submit_error=lambda node: NodeUnreachable(f"upload on {node}: connection refused"),
    )


def bad_result(polls: int = 2) -> Behaviour:
    """Succeeds, but what it serves as the result is not a video."""
    return Behaviour("serves garbage", succeeds(polls).frames, garbage_result=True)


# -- the fleet --------------------------------------------------------------------------------
@dataclass
class Call:
    method: str
    node: str
    job_id: str | None
    at: float


@dataclass
class FakeJob:
    job_id: str
    behaviour: Behaviour
    audio: Path
    video: Path
    options: dict[str, Any]
    polls: int = 0
    info: dict[str, Any] = field(default_factory=lambda: _frame("running", 0))

    @property
    def state(self) -> str:
        return str(self.info["state"])

    def public(self) -> dict[str, Any]:
        return {"job_id": self.job_id, **self.info}


@dataclass
class FakeNode:
    name: str
    max_concurrent: int = 1
    # Behaviours of the next new jobs, first come first used; then ``default`` for the rest.
    script: list[Behaviour] = field(default_factory=list)
    default: Behaviour = field(default_factory=succeeds)
    # Every call raises NodeUnreachable, as if the box were off.
    down: bool = False
    health_status: str = "ready"
    # Loop turns a DELETE takes to land, like a network round trip (0: at once).
    delete_latency_turns: int = 0
    jobs: dict[str, FakeJob] = field(default_factory=dict)
    peak_running: int = 0

    def running(self) -> list[str]:
        return [j.job_id for j in self.jobs.values() if j.state in RUNNING_STATES]

    def next_behaviour(self) -> Behaviour:
        return self.script.pop(0) if self.script else self.default

    def start_job(
        self,
        job_id: str,
        behaviour: Behaviour,
        state: str = "running",
        progress: float = 0.0,
        polls: int = 0,
        audio: Path = Path("audio"),
        video: Path = Path("video"),
    ) -> FakeJob:
        """Put a job on the node directly (one that was there before the dispatcher started)."""
        job = FakeJob(job_id, behaviour, audio, video, {}, polls, _frame(state, progress))
        self.jobs[job_id] = job
        self.peak_running = max(self.peak_running, len(self.running()))
        return job


class FakeNodes:
    """A scripted fleet behind the ``NodeClient`` interface; no HTTP anywhere."""

    def __init__(self, clock: FakeClock, result_video: Path) -> None:
        self.clock = clock
        self.result_video = result_video
        self.nodes: dict[str, FakeNode] = {}
        self.calls: list[Call] = []

    def add(
        self,
        name: str,
        max_concurrent: int = 1,
        script: Iterable[Behaviour] = (),
        default: Behaviour | None = None,
    ) -> FakeNode:
        node = FakeNode(name, max_concurrent, list(script), default or succeeds())
        self.nodes[name] = node
        return node

    def machines_json(self, enabled: Mapping[str, bool] | None = None) -> str:
        """machines.json text for the nodes added so far, in the order they were added."""
        enabled = enabled or {}
        machines = [
            {"name": n.name, "host": f"{n.name}.test", "port": 9000,
             "max_concurrent": n.max_concurrent, "enabled": enabled.get(n.name, True)}
            for n in self.nodes.values()
        ]  # fmt: skip
        return json.dumps({"machines": machines})

    # -- what the tests read ---------------------------------------------------------------
    def calls_of(self, method: str, node: str | None = None) -> list[Call]:
        return [c for c in self.calls if c.method == method and node in (None, c.node)]

    def submitted(self, node: str | None = None) -> list[str]:
        """Job ids uploaded (in order), to one node or to any."""
        return [str(c.job_id) for c in self.calls_of("submit", node)]

    def deleted(self, node: str | None = None) -> list[str]:
        return [str(c.job_id) for c in self.calls_of("delete", node)]

    def refusals(self) -> int:
        """409s answered because a node was really full (the engine overfilled it)."""
        return sum(1 for c in self.calls if c.method == "overfilled")

    # -- the NodeClient interface ------------------------------------------------------------
    def _enter(self, method: str, machine: MachineConfig, job_id: str | None) -> FakeNode:
        self.calls.append(Call(method, machine.name, job_id, self.clock()))
        node = self.nodes[machine.name]
        if node.down:
            raise NodeUnreachable(f"{method} on {machine.name}: connection refused")
        return node

    def _known(self, node: FakeNode, job_id: str, what: str) -> FakeJob:
        job = node.jobs.get(job_id)
        if job is None:
            raise JobUnknown(f"{what}: node does not know the job ({job_id})")
        return job

    async def health(self, machine: MachineConfig, timeout_s: float) -> dict[str, Any]:
        node = self._enter("health", machine, None)
        return {
            "status": node.health_status,
            "max_concurrent": node.max_concurrent,
            "free_slots": max(0, node.max_concurrent - len(node.running())),
            "running": node.running(),
            "jobs": {j.job_id: j.state for j in node.jobs.values()},
        }

    async def submit(
        self,
        machine: MachineConfig,
        job_id: str,
        audio: Path,
        video: Path,
        options: Mapping[str, Any],
    ) -> dict[str, Any]:
        node = self._enter("submit", machine, job_id)
        if job_id in node.jobs:  # idempotent, like the agent: the job it already has
            return node.jobs[job_id].public()
        if len(node.running()) >= node.max_concurrent:
            self.calls.append(Call("overfilled", machine.name, job_id, self.clock()))
            raise NodeFull(f"upload: no free slot on {machine.name}")
        behaviour = node.next_behaviour()
        if behaviour.submit_error is not None:
            raise behaviour.submit_error(machine.name)
        if not (audio.is_file() and video.is_file()):
            raise AssertionError(f"the engine uploaded files that do not exist: {audio}, {video}")
        job = node.start_job(job_id, behaviour, audio=audio, video=video)
        job.options = dict(options)
        return job.public()

    async def job(
        self,
        machine: MachineConfig,
        job_id: str,
        wait_s: float = 0.0,
        seen: tuple[str, float] | None = None,
    ) -> dict[str, Any]:
        # Answers at once, like a node that does not long-poll: the engine paces its polls.
        node = self._enter("job", machine, job_id)
        job = self._known(node, job_id, "status poll")
        if job.state in RUNNING_STATES:
            frame = job.behaviour.frames(job.polls)
            job.polls += 1
            if isinstance(frame, JobUnknown):
                del node.jobs[job_id]  # the node forgot it: it restarted, say
            if isinstance(frame, NodeError):
                raise frame
            job.info = frame
        return job.public()

    async def fetch_result(self, machine: MachineConfig, job_id: str, dest: Path) -> int:
        node = self._enter("fetch_result", machine, job_id)
        job = self._known(node, job_id, "result download")
        if job.state != "succeeded":
            raise NodeFull(f"result download: job '{job_id}' has no result: it is {job.state}")
        if job.behaviour.garbage_result:
            dest.write_bytes(b"this is not a video " * 50)
        else:
            shutil.copyfile(self.result_video, dest)
        return dest.stat().st_size

    async def delete(self, machine: MachineConfig, job_id: str) -> None:
        node = self._enter("delete", machine, job_id)
        for _ in range(node.delete_latency_turns):
            await asyncio.sleep(0)
        node.jobs.pop(job_id, None)  # 404 is fine: already gone is what we wanted
