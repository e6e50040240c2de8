"""The command backend against a real process: tests/scripts/fake_model.py."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import imageio_ffmpeg
import pytest

from node_agent.backends import command as command_module
from node_agent.backends.base import BackendError, JobSpec
from node_agent.backends.command import (
    CommandBackend,
    exit_description,
    format_argv,
    parse_command,
    percent_from_line,
    placeholder_values,
    probe_executable,
    split_lines,
)
from node_agent.settings import NodeSettings

FAKE_MODEL = Path(__file__).parent / "scripts" / "fake_model.py"
PROGRESS_REGEX = r"progress: (\d+(?:\.\d+)?)%"
MODEL_ARGS = "--audio {audio} --video {video} --output {output}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    # Spaces in the names: arguments must reach the model whole, with no shell in between.
    folder = tmp_path_factory.mktemp("media") / "input files"
    folder.mkdir()
    audio, video = folder / "voice 1.wav", folder / "face 1.mp4"
    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    quiet = [ffmpeg, "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i"]
    subprocess.run([*quiet, "sine=duration=1", str(audio)], check=True)
    subprocess.run(
        [*quiet, "testsrc=size=64x64:rate=10:duration=1", "-pix_fmt", "yuv420p", str(video)],
        check=True,
    )
    return audio, video


@pytest.fixture
def spec(tmp_path: Path, media: tuple[Path, Path]) -> JobSpec:
    audio, video = media
    workdir = tmp_path / "job dir"
    workdir.mkdir()
    return JobSpec(
        job_id="job-1", audio=audio, video=video, output=workdir / "out.mp4", workdir=workdir
    )


def backend(extra: str = "", *, regex: str = PROGRESS_REGEX, **kwargs: float) -> CommandBackend:
    command = f"{shlex.quote(sys.executable)} {shlex.quote(str(FAKE_MODEL))} {MODEL_ARGS} {extra}"
    settings = NodeSettings(backend="command", command=command, command_progress_regex=regex)
    return CommandBackend(settings, **kwargs)


class Progress:
    def __init__(self) -> None:
        self.reports: list[tuple[float, str]] = []

    def __call__(self, percent: float, stage: str) -> None:
        self.reports.append((percent, stage))

    @property
    def percents(self) -> list[float]:
        return [percent for percent, _ in self.reports]


# --- pure helpers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("", "command is empty"),
        ("   ", "command is empty"),
        ("model --in {input}", "unknown placeholder {input}"),
        ("model --in {}", "unknown placeholder {}"),
        ("model --in {audio.name}", "unknown placeholder {audio.name}"),
        ("model --in {audio", "unbalanced braces"),
        ("model 'unclosed", "cannot be split"),
    ],
)
def test_bad_templates_are_refused_with_an_actionable_message(command: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        CommandBackend(NodeSettings(backend="command", command=command))


def test_unknown_placeholder_message_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=re.escape("{audio}, {video}, {output}")):
        parse_command("model {face}")


def test_format_argv_keeps_each_argument_whole(spec: JobSpec) -> None:
    template = parse_command("model --face {video} --out={output} '{job_id} x' {{literal}}")
    argv = format_argv(template, placeholder_values(spec))
    assert argv == [
        "model",
        "--face",
        str(spec.video),
        f"--out={spec.output}",
        "job-1 x",
        "{literal}",
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("progress: 40%", 40.0),
        ("step 3 progress: 12.5% eta 3s", 12.5),
        ("progress: 250%", 100.0),
        ("loading model", None),
        ("progress: %", None),
    ],
)
def test_percent_from_line(line: str, expected: float | None) -> None:
    pattern = re.compile(r"progress: (\d*(?:\.\d+)?)%")
    assert percent_from_line(pattern, line) == expected


def test_no_regex_means_no_progress() -> None:
    assert percent_from_line(None, "progress: 40%") is None


@pytest.mark.parametrize(
    ("buffer", "lines", "rest"),
    [
        ("a\nb\n", ["a", "b"], ""),
        ("a\r\nb", ["a"], "b"),
        ("10%|##  \r20%|###  \r", ["10%|##  ", "20%|###  "], ""),
        ("no end", [], "no end"),
    ],
)
def test_split_lines(buffer: str, lines: list[str], rest: str) -> None:
    assert split_lines(buffer) == (lines, rest)


def test_exit_description() -> None:
    assert exit_description(3) == "exited with status 3"
    assert exit_description(-signal.SIGKILL) == "was killed by SIGKILL"


def test_probe_finds_executables() -> None:
    assert probe_executable(sys.executable).ok
    missing = probe_executable("no-such-model-binary")
    assert not missing.ok and "not found" in missing.detail
    relative = probe_executable("./run.sh")
    assert not relative.ok and "absolute path" in relative.detail


# --- real processes -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_success_parses_progress_and_leaves_the_output(spec: JobSpec) -> None:
    progress = Progress()
    await backend().run(spec, progress)

    # stdout lines, \r-separated stderr updates, and the clamped 250 % all count.
    assert progress.percents == [0.0, 10.0, 25.0, 40.0, 90.0, 99.0, 100.0]
    with av.open(str(spec.output)) as container:
        assert len(container.streams.video) == 1
        assert len(container.streams.audio) == 1


@pytest.mark.anyio
async def test_failure_reports_status_and_the_last_stderr_lines(spec: JobSpec) -> None:
    with pytest.raises(BackendError) as caught:
        await backend("--fail 3").run(spec, Progress())

    message = caught.value.message
    assert "exited with status 3" in message
    assert "error line 15" in message and "error line 6" in message
    assert "error line 5\n" not in message


@pytest.mark.anyio
async def test_exit_zero_without_output_is_an_error(spec: JobSpec) -> None:
    with pytest.raises(BackendError, match="wrote no output"):
        await backend("--no-output").run(spec, Progress())


@pytest.mark.anyio
async def test_a_missing_executable_is_a_backend_error(spec: JobSpec) -> None:
    settings = NodeSettings(backend="command", command="/nonexistent/model {audio}")
    with pytest.raises(BackendError, match="cannot start"):
        await CommandBackend(settings).run(spec, Progress())


@pytest.mark.anyio
@pytest.mark.parametrize("ignore_term", [False, True])
async def test_cancel_kills_the_command_and_its_children(
    spec: JobSpec, tmp_path: Path, ignore_term: bool
) -> None:
    pid_file = tmp_path / "pids"
    extra = f"--hang --pid-file {shlex.quote(str(pid_file))}"
    if ignore_term:
        extra += " --ignore-term"  # only SIGKILL after the grace period ends it
    progress = Progress()
    task = asyncio.create_task(backend(extra, kill_grace_s=0.3).run(spec, progress))
    pids = await _read_pids(pid_file)

    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    await _wait_until_gone(pids, timeout_s=2.0)
    assert time.monotonic() - started < 2.0


async def _read_pids(pid_file: Path) -> list[int]:
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text().strip():
            return [int(pid) for pid in pid_file.read_text().split()]
        await asyncio.sleep(0.02)
    raise AssertionError("the fake model never wrote its pids")


async def _wait_until_gone(pids: list[int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if _alive(p)]}"
        await asyncio.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed grandchild stays a zombie until whoever adopted it reaps it; it is dead.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.anyio
async def test_a_child_left_holding_the_output_does_not_hang_the_job(
    spec: JobSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(command_module, "LINGER_S", 0.2)
    # The shell exits at once, but the background sleep keeps its stdout open.
    script = 'sleep 30 & echo $! > pid; cp "$0" "$1"'
    settings = NodeSettings(backend="command", command=f"sh -c '{script}' {{video}} {{output}}")
    started = time.monotonic()
    await CommandBackend(settings).run(spec, Progress())

    assert time.monotonic() - started < 2.0
    assert spec.output.read_bytes() == spec.video.read_bytes()
    await _wait_until_gone([int((spec.workdir / "pid").read_text())], timeout_s=2.0)
