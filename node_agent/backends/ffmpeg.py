"""The built-in backend: loop the video to the audio's length and mux the audio.

A real media job that needs no GPU, so the demo and the tests run anywhere. It stands in
for a lip-sync model: same inputs, same kind of output, real progress, real failures.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from heygem_common.media import NotMedia, ffmpeg_exe, require_audio, require_video
from node_agent.backends.base import (
    Backend,
    BackendError,
    BackendHealth,
    JobSpec,
    ProgressFn,
    record_process_group,
)
from node_agent.settings import NodeSettings

STDERR_LINES_KEPT = 12


def ffmpeg_argv(
    spec: JobSpec, duration_s: float, preset: str, exe: str, readrate: float = 0.0
) -> list[str]:
    pace = ["-readrate", f"{readrate:g}"] if readrate > 0 else []
    return [
        exe, "-hide_banner", "-nostdin", "-y", "-loglevel", "error",
        # -stream_loop -1 repeats the video for as long as the output needs it.
        *pace, "-stream_loop", "-1", "-i", str(spec.video),
        *pace, "-i", str(spec.audio),
        "-map", "0:v:0", "-map", "1:a:0",
        "-t", f"{duration_s:.3f}",
        "-c:v", "libx264", "-preset", preset, "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-b:a", "128k",
        "-movflags", "+faststart",
        "-progress", "pipe:1", "-nostats",
        str(spec.output),
    ]  # fmt: skip


def progress_from_line(line: str, duration_s: float) -> float | None:
    """Percent done from one line of ffmpeg's ``-progress`` output, if it carries time."""
    key, _, value = line.strip().partition("=")
    # out_time_us and (despite its name) out_time_ms are both microseconds.
    if key not in ("out_time_us", "out_time_ms") or duration_s <= 0:
        return None
    try:
        seconds = int(value) / 1_000_000
    except ValueError:  # "N/A" before the first frame
        return None
    return max(0.0, min(99.0, 100.0 * seconds / duration_s))


class FfmpegBackend(Backend):
    name = "ffmpeg"

    def __init__(self, settings: NodeSettings) -> None:
        self._preset = settings.ffmpeg_preset
        self._readrate = settings.ffmpeg_readrate

    async def run(self, spec: JobSpec, progress: ProgressFn) -> None:
        duration_s = await asyncio.to_thread(_check_inputs, spec)
        progress(0.0, "encoding")
        process = await asyncio.create_subprocess_exec(
            *ffmpeg_argv(spec, duration_s, self._preset, ffmpeg_exe(), self._readrate),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        record_process_group(spec.workdir, process.pid)
        try:
            stderr_tail = await _follow(process, duration_s, progress)
        except BaseException:
            # Cancelled (or we failed): never leave an encoder running without its job.
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            tail = "\n".join(stderr_tail) or "no error output"
            raise BackendError(f"ffmpeg exited with status {process.returncode}: {tail}")
        progress(100.0, "done")

    async def probe(self) -> BackendHealth:
        try:
            exe = ffmpeg_exe()
        except RuntimeError as exc:
            return BackendHealth(ok=False, detail=f"no ffmpeg binary: {exc}")
        return BackendHealth(ok=True, detail=exe)


def _check_inputs(spec: JobSpec) -> float:
    try:
        audio = require_audio(spec.audio, "the audio file")
        require_video(spec.video, "the video file")
    except NotMedia as exc:
        raise BackendError(str(exc)) from exc
    return audio.duration_s


async def _follow(
    process: asyncio.subprocess.Process, duration_s: float, progress: ProgressFn
) -> deque[str]:
    assert process.stdout is not None and process.stderr is not None
    tail: deque[str] = deque(maxlen=STDERR_LINES_KEPT)

    async def read_progress() -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            percent = progress_from_line(raw.decode(errors="replace"), duration_s)
            if percent is not None:
                progress(percent, "encoding")

    async def read_errors() -> None:
        assert process.stderr is not None
        async for raw in process.stderr:
            tail.append(raw.decode(errors="replace").rstrip())

    await asyncio.gather(read_progress(), read_errors())
    await process.wait()
    return tail
