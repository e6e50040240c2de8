"""The command backend: run any lip-sync model (Wav2Lip, LatentSync, MuseTalk...) as a process.

``settings.command`` is an argv template such as::

    python inference.py --face {video} --audio {audio} --outfile {output}

It is split like a shell would (``shlex``) but run without one, so file names with spaces
or quotes need no escaping. Placeholders: {audio} {video} {output} {workdir} {job_id};
write ``{{`` and ``}}`` for literal braces. The process runs in the job's workdir, in its
own session, so cancelling the job can end it and every child it started. Relative paths
in the template are therefore relative to the workdir: give the model's files as absolute
paths, or wrap it, e.g. ``sh -c 'cd /opt/Wav2Lip && exec python inference.py ...'``.

If ``settings.command_progress_regex`` is set, each line of stdout or stderr it matches
gives the progress (group 1, a number in 0..100). Lines end at ``\\n`` or ``\\r``, so the
``\\r``-refreshed bars of tqdm are seen as they move.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import os
import re
import shlex
import shutil
import signal
import string
from collections import deque
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from node_agent.backends.base import (
    Backend,
    BackendError,
    BackendHealth,
    JobSpec,
    ProgressFn,
    record_process_group,
)
from node_agent.settings import NodeSettings

PLACEHOLDERS = ("audio", "video", "output", "workdir", "job_id")
TAIL_LINES = 10
KILL_GRACE_S = 5.0
# After the command exits, how long children that inherited its output may keep it open.
LINGER_S = 2.0
EXIT_POLL_S = 0.1
_CHUNK = 64 * 1024
_MAX_LINE = 64 * 1024  # a "line" that never ends is cut here rather than held forever
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


# --- pure helpers -------------------------------------------------------------------------


def parse_command(command: str) -> list[str]:
    """Split and check an argv template; ValueError says what an operator must fix."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ValueError(f"command {command!r} cannot be split into arguments: {exc}") from exc
    if not argv:
        raise ValueError(
            "command is empty: set it (HEYGEM_NODE_COMMAND) to the model's command line, "
            "e.g. 'python inference.py --audio {audio} --face {video} --outfile {output}'"
        )
    for arg in argv:
        _check_placeholders(arg)
    return argv


def _check_placeholders(arg: str) -> None:
    known = ", ".join(f"{{{name}}}" for name in PLACEHOLDERS)
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(arg) if name is not None]
    except ValueError as exc:
        raise ValueError(
            f"command argument {arg!r} has unbalanced braces ({exc}); "
            "write {{ and }} for literal braces"
        ) from exc
    for name in fields:
        if name not in PLACEHOLDERS:
            raise ValueError(
                f"command argument {arg!r} uses unknown placeholder {{{name}}}; known: {known}"
            )


def placeholder_values(spec: JobSpec) -> dict[str, str]:
    return {
        "audio": str(spec.audio),
        "video": str(spec.video),
        "output": str(spec.output),
        "workdir": str(spec.workdir),
        "job_id": spec.job_id,
    }


def format_argv(template: list[str], values: Mapping[str, str]) -> list[str]:
    return [arg.format_map(values) for arg in template]


def percent_from_line(pattern: re.Pattern[str] | None, line: str) -> float | None:
    if pattern is None:
        return None
    match = pattern.search(line)
    if match is None:
        return None
    try:
        return max(0.0, min(100.0, float(match.group(1))))
    except (TypeError, ValueError):  # the group matched nothing, or not a number
        return None


def split_lines(buffer: str) -> tuple[list[str], str]:
    """Complete lines in ``buffer`` and the unfinished rest."""
    parts = _LINE_BREAK.split(buffer)
    return parts[:-1], parts[-1]


def probe_executable(exe: str) -> BackendHealth:
    if os.sep in exe and not os.path.isabs(exe):
        return BackendHealth(
            ok=False,
            detail=f"command {exe!r} is a relative path, but the command runs in each job's "
            "workdir: use an absolute path",
        )
    found = shutil.which(exe)  # for a path, checks that it is an executable file
    if found is None:
        return BackendHealth(
            ok=False, detail=f"command {exe!r} not found on PATH or not an executable file"
        )
    return BackendHealth(ok=True, detail=found)


def exit_description(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        # SIGKILL from nowhere is usually the kernel's out-of-memory killer.
        return f"was killed by {name}"
    return f"exited with status {returncode}"


# --- the backend --------------------------------------------------------------------------


class CommandBackend(Backend):
    name = "command"

    def __init__(self, settings: NodeSettings, *, kill_grace_s: float = KILL_GRACE_S) -> None:
        self._template = parse_command(settings.command)
        regex = settings.command_progress_regex
        self._pattern = re.compile(regex) if regex else None
        self._kill_grace_s = kill_grace_s
        self._label = Path(self._template[0]).name

    async def run(self, spec: JobSpec, progress: ProgressFn) -> None:
        argv = format_argv(self._template, placeholder_values(spec))
        spec.workdir.mkdir(parents=True, exist_ok=True)
        progress(0.0, f"starting {self._label}")
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=spec.workdir,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                # Its own process group, so cancel can kill the children a model spawns.
                start_new_session=True,
            )
        except OSError as exc:  # not found, not executable, bad workdir
            raise BackendError(f"cannot start {argv[0]!r}: {exc}") from exc
        record_process_group(spec.workdir, process.pid)
        try:
            tails = await self._follow(process, progress)
        except BaseException:
            await _stop(process, self._kill_grace_s)
            raise
        assert process.returncode is not None  # _follow waited for it
        _check_outcome(process.returncode, tails, spec.output)
        progress(100.0, "done")

    async def probe(self) -> BackendHealth:
        return probe_executable(self._template[0])

    async def _follow(
        self, process: asyncio.subprocess.Process, progress: ProgressFn
    ) -> tuple[deque[str], deque[str]]:
        assert process.stdout is not None and process.stderr is not None
        stdout_tail: deque[str] = deque(maxlen=TAIL_LINES)
        stderr_tail: deque[str] = deque(maxlen=TAIL_LINES)

        async def read(stream: asyncio.StreamReader, tail: deque[str]) -> None:
            async for line in iter_lines(stream):
                if line.strip():
                    tail.append(line.rstrip())
                percent = percent_from_line(self._pattern, line)
                if percent is not None:
                    # 100 belongs to "done", which only the exit status decides.
                    progress(min(percent, 99.0), f"running {self._label}")

        readers = asyncio.gather(
            read(process.stdout, stdout_tail), read(process.stderr, stderr_tail)
        )
        exited = asyncio.ensure_future(_exited(process))
        try:
            either: list[asyncio.Future[Any]] = [readers, exited]
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not readers.done():
                # The command is gone but a child it started still holds its output open
                # (and process.wait() waits for the pipes too): give it a moment, then end it.
                try:
                    await asyncio.wait_for(asyncio.shield(readers), LINGER_S)
                except TimeoutError:
                    _signal_group(process.pid, signal.SIGKILL)
            await process.wait()
            await readers
        finally:
            exited.cancel()
            readers.cancel()
        return stdout_tail, stderr_tail


async def iter_lines(stream: asyncio.StreamReader) -> AsyncIterator[str]:
    """Decoded lines of a byte stream, broken at \\n, \\r\\n or \\r."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    while chunk := await stream.read(_CHUNK):
        lines, pending = split_lines(pending + decoder.decode(chunk))
        for line in lines:
            yield line
        if len(pending) > _MAX_LINE:
            yield pending
            pending = ""
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending


async def _exited(process: asyncio.subprocess.Process) -> None:
    # returncode is set as soon as the process ends, before its pipes close.
    while process.returncode is None:
        await asyncio.sleep(EXIT_POLL_S)


def _check_outcome(returncode: int, tails: tuple[deque[str], deque[str]], output: Path) -> None:
    stdout_tail, stderr_tail = tails
    if returncode != 0:
        # Many models print their traceback to stdout; show that when stderr is silent.
        tail = "\n".join(stderr_tail or stdout_tail) or "no output"
        raise BackendError(f"command {exit_description(returncode)}:\n{tail}")
    if not output.is_file() or output.stat().st_size == 0:
        raise BackendError(
            f"command exited with status 0 but wrote no output at {output}: "
            "does the template pass {output} where the model writes its video?"
        )


async def _stop(process: asyncio.subprocess.Process, grace_s: float) -> None:
    """SIGTERM the command's whole process group, SIGKILL it after ``grace_s``."""
    _signal_group(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), grace_s)
    except TimeoutError:
        pass
    finally:
        # Runs even if we are cancelled again while waiting, and also catches children
        # that outlived a leader which obeyed SIGTERM.
        _signal_group(process.pid, signal.SIGKILL)
    await process.wait()


def _signal_group(pgid: int, signum: int) -> None:
    # The group is gone when every member has exited; that is the goal, not an error.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)
