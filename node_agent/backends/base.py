"""What every model backend of the node agent provides.

A backend turns one job (an audio file and a video file on local disk) into one output
video. The job manager owns slots, bookkeeping and cancellation; a backend only does the
work and reports progress.

Errors a backend raises:

    BackendError            the job failed; ``message`` is shown to the user
      +-- BackendBusy       the model refused the job because it is busy (HeyGem 10001);
                            the job was not started, so the dispatcher retries it elsewhere
                            without charging an attempt

Cancellation is ``asyncio.CancelledError`` delivered into ``run``: a backend must stop its
underlying work (kill the process, forget the remote job) before letting it propagate.
"""

from __future__ import annotations

import abc
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

# percent in 0..100, and a short human-readable stage ("encoding", "queued on model", ...)
ProgressFn = Callable[[float, str], None]


class BackendError(Exception):
    """The job failed; the message is meant for a person."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BackendBusy(BackendError):
    """The model dropped the submit because it is busy; nothing ran."""


@dataclass(frozen=True)
class JobSpec:
    job_id: str
    audio: Path
    video: Path
    output: Path  # where the backend must leave the finished mp4
    workdir: Path  # a private folder for intermediate files, removed with the job
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BackendHealth:
    ok: bool
    detail: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)


PROCESS_GROUP_FILE = "pgid"


def record_process_group(workdir: Path, pgid: int) -> None:
    """Note the job's process group, so a restarted agent can stop what a crash left."""
    (workdir / PROCESS_GROUP_FILE).write_text(str(pgid))


def kill_leftover_group(workdir: Path, job_id: str) -> bool:
    """Kill the process group a dead agent left running for ``job_id``; True if it did.

    The group id is checked against /proc first: after a reboot the number may belong to
    somebody else, and only a process working on this job (its id in the command line, or
    its working folder inside the job's) is ours to kill.
    """
    try:
        pgid = int((workdir / PROCESS_GROUP_FILE).read_text())
        cmdline = Path(f"/proc/{pgid}/cmdline").read_bytes()
        cwd = os.readlink(f"/proc/{pgid}/cwd")
    except (OSError, ValueError):
        return False  # never started, already gone, or not Linux
    if job_id.encode() not in cmdline and not cwd.startswith(str(workdir)):
        return False
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class Backend(abc.ABC):
    name: ClassVar[str]

    @abc.abstractmethod
    async def run(self, spec: JobSpec, progress: ProgressFn) -> None:
        """Produce ``spec.output`` or raise ``BackendError``."""

    async def probe(self) -> BackendHealth:
        """Cheap check that the model behind this backend can take work."""
        return BackendHealth(ok=True)

    def adopt_leftover(self, job_id: str, workdir: Path) -> None:
        """A job was running when the agent died: stop whatever it left behind.

        Called by the job manager at start-up, before the job's folder is removed. Backends
        that run processes record their group (``record_process_group``) so it can be killed
        here; otherwise a model the dead agent started would share the GPU with new jobs.
        """
        kill_leftover_group(workdir, job_id)

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release clients and processes when the node agent stops."""
