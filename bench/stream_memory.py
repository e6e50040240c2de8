"""Does memory stay flat whatever the upload size? Peak RSS of a real dispatcher and node agent.

Starts one node agent (ffmpeg backend) and a dispatcher on loopback ports in a temporary
folder, then pushes a small and a big video (same 2 s audio) through POST /tasks and follows
each task to ``completed``. The upload travels client -> dispatcher (spooled to disk) ->
node agent (spooled to disk) and the result comes back node -> dispatcher, so both servers
see every byte of the video. For each upload it measures, per process, how far the resident
set rose above where it stood just before the upload (peak RSS growth). If the files really
stream, that growth does not depend on the upload size.

Peaks come from VmHWM in /proc/<pid>/status, reset before each upload by writing 5 to
/proc/<pid>/clear_refs, so a short spike between two samples is not missed. Where the reset is
not allowed, a 10 ms VmRSS sampler stands in. The client is this process: it uploads with
file objects (httpx reads them in 64 KiB chunks), and its own growth is reported too.

The node's ffmpeg child is a separate process and is not counted: its memory follows the
video's resolution, not the file size, and the audio is kept to 2 s so the job ends quickly.

Run: ``.venv/bin/python bench/stream_memory.py [--big-mb 300] [--small-mb 1]``
Figures, not asserts: see bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heygem_common.launcher import (  # noqa: E402
    Service,
    dispatcher_service,
    machine_entry,
    node_service,
    write_machines,
)
from heygem_common.media import ffmpeg_exe, probe  # noqa: E402

MB = 1_000_000
MIB = 1024 * 1024
AUDIO_SECONDS = 2
# Generated media is kept between runs: the big video costs a few seconds to make.
CACHE_DIR = Path(tempfile.gettempdir()) / "heygem-stream-memory"
# Short intervals so a task is handed over and followed within a fraction of a second.
DISPATCHER_ENV = {
    "HEYGEM_HEALTH_INTERVAL_S": "0.5",
    "HEYGEM_POLL_INTERVAL_S": "0.2",
    "HEYGEM_MACHINES_RELOAD_INTERVAL_S": "0.5",
    "HEYGEM_MIN_FREE_DISK_BYTES": "0",
}


# -- media -------------------------------------------------------------------------------------
def make_audio(path: Path) -> Path:
    if not path.exists():
        _ffmpeg(
            "-f",
            "lavfi",
            "-i",
            f"sine=frequency=440:duration={AUDIO_SECONDS}",
            "-c:a",
            "libmp3lame",
            "-b:a",
            "64k",
            str(path),
        )
    return path


def make_video(path: Path, size_mb: float, resolution: str) -> Path:
    """A valid mp4 of about ``size_mb`` MB, made fast: noise defeats compression at -q:v 1.

    ``-fs`` stops the encoder once the file reaches the size and still finalizes the mp4,
    so no duration has to be guessed from a bitrate.
    """
    if not path.exists():
        partial = path.with_name(path.stem + ".part.mp4")
        _ffmpeg(
            "-f",
            "lavfi",
            "-i",
            f"testsrc2=size={resolution}:rate=30,noise=alls=60:allf=t",
            "-t",
            "600",
            "-fs",
            str(int(size_mb * MB)),
            "-c:v",
            "mpeg4",
            "-q:v",
            "1",
            str(partial),
        )
        partial.rename(path)  # an interrupted run leaves no half file under the cached name
    return path


def _ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


# -- memory ------------------------------------------------------------------------------------
def status_kib(pid: int, key: str) -> int:
    """One ``kB`` field of /proc/<pid>/status (VmRSS: now, VmHWM: peak since the last reset)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/{pid}/status")


def reset_peak(pid: int) -> bool:
    """Make VmHWM start again from the current RSS (Linux >= 4.0); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class RssSampler:
    """Polls VmRSS of some processes in a thread and keeps the maximum of each."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.01) -> None:
        self.pids = pids
        self.interval_s = interval_s
        self.peaks = {name: 0 for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in self.pids.items():
                self.peaks[name] = max(self.peaks[name], status_kib(pid, "VmRSS"))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Measurement:
    label: str
    upload_bytes: int
    upload_s: float  # the POST: client -> dispatcher, spooled and probed
    to_node_s: float  # stage "uploading" -> "running": dispatcher -> node, spooled there
    total_s: float  # from the POST to the task's ``completed``
    growth_kib: dict[str, int]  # peak RSS minus RSS just before, per process
    peak_kib: dict[str, int]

    @property
    def upload_mb_s(self) -> float:
        return self.upload_bytes / MB / self.upload_s

    @property
    def to_node_mb_s(self) -> float:
        return self.upload_bytes / MB / self.to_node_s


@contextmanager
def peak_growth(pids: dict[str, int]) -> Iterator[tuple[dict[str, int], dict[str, int]]]:
    """Fill (growth, peak) in KiB per process for the block's duration."""
    before = {name: status_kib(pid, "VmRSS") for name, pid in pids.items()}
    exact = all([reset_peak(pid) for pid in pids.values()])
    growth: dict[str, int] = {}
    peak: dict[str, int] = {}
    with RssSampler(pids) as sampler:
        yield growth, peak
    for name, pid in pids.items():
        sampled = sampler.peaks[name]
        peak[name] = max(sampled, status_kib(pid, "VmHWM")) if exact else sampled
        growth[name] = peak[name] - before[name]


# -- the fleet ---------------------------------------------------------------------------------
def start_fleet(workdir: Path) -> tuple[Service, Service]:
    node = node_service(workdir, "node-1", max_concurrent=1)
    machines = workdir / "machines.json"
    write_machines(machines, [machine_entry(node, 1)])
    dispatcher = dispatcher_service(workdir, machines, env=DISPATCHER_ENV)
    node.start()
    dispatcher.start()
    return dispatcher, node


def wait_node_accepting(dispatcher: Service, timeout_s: float = 30.0) -> None:
    """The dispatcher hands tasks only to nodes its health probe has seen."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if httpx.get(f"{dispatcher.url}/health", timeout=5).json()["nodes_accepting"] > 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the dispatcher never saw its node accepting:\n{dispatcher.log_tail()}")


# -- one upload --------------------------------------------------------------------------------
def submit(client: httpx.Client, url: str, audio: Path, video: Path) -> str:
    # File objects, not bytes: httpx reads them chunk by chunk, so the client stays flat too.
    with audio.open("rb") as audio_fh, video.open("rb") as video_fh:
        response = client.post(
            f"{url}/tasks",
            files={"audio_file": audio_fh, "video_file": video_fh},
            timeout=httpx.Timeout(60.0, write=600.0),
        )
    response.raise_for_status()
    task_id: str = response.json()["task_id"]
    return task_id


def wait_completed(
    client: httpx.Client, url: str, task_id: str, timeout_s: float = 300.0
) -> dict[str, float]:
    """Follow the task to ``completed``; return when each stage was first seen (monotonic)."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        task = client.get(f"{url}/tasks/{task_id}", timeout=10).json()
        seen.setdefault(task["stage"] or task["status"], time.monotonic())
        if task["status"] == "completed":
            return seen
        if task["status"] in ("failed", "cancelled"):
            raise RuntimeError(f"task {task_id} {task['status']}: {task['error_message']}")
        time.sleep(0.02)
    raise RuntimeError(f"task {task_id} not completed after {timeout_s}s")


def measure(
    client: httpx.Client, label: str, dispatcher: Service, node: Service, audio: Path, video: Path
) -> Measurement:
    assert dispatcher.process is not None and node.process is not None
    # Service.process is the group leader: the python process itself, no shell in between.
    pids = {"dispatcher": dispatcher.process.pid, "node": node.process.pid, "client": os.getpid()}
    with peak_growth(pids) as (growth, peak):
        started = time.monotonic()
        task_id = submit(client, dispatcher.url, audio, video)
        uploaded = time.monotonic()
        seen = wait_completed(client, dispatcher.url, task_id)
        done = time.monotonic()
    size = audio.stat().st_size + video.stat().st_size
    # A hand-over quicker than one poll is never seen as "uploading": it began by the POST's end.
    handed_over = next(seen[s] for s in ("running", "fetching", "done") if s in seen)
    to_node_s = handed_over - seen.get("uploading", uploaded)
    return Measurement(label, size, uploaded - started, to_node_s, done - started, growth, peak)


# -- report ------------------------------------------------------------------------------------
def mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def print_table(rows: list[Measurement]) -> None:
    head = (
        f"{'run':<7} {'upload MB':>9} {'POST s':>6} {'MB/s':>5} {'->node s':>8} "
        f"{'MB/s':>5} {'done s':>6} {'dispatcher peak/+growth MiB':>27} "
        f"{'node peak/+growth MiB':>21} {'client +MiB':>11}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        disp = f"{mib(r.peak_kib['dispatcher'])} / +{mib(r.growth_kib['dispatcher'])}"
        node = f"{mib(r.peak_kib['node'])} / +{mib(r.growth_kib['node'])}"
        print(
            f"{r.label:<7} {r.upload_bytes / MB:>9.1f} {r.upload_s:>6.2f} "
            f"{r.upload_mb_s:>5.0f} {r.to_node_s:>8.2f} {r.to_node_mb_s:>5.0f} "
            f"{r.total_s:>6.2f} {disp:>27} {node:>21} "
            f"{'+' + mib(r.growth_kib['client']):>11}"
        )


def print_ratios(small: Measurement, big: Measurement) -> None:
    print(f"\nupload size ratio big/small: {big.upload_bytes / small.upload_bytes:.0f}x")
    for name in ("dispatcher", "node", "client"):
        extra = big.growth_kib[name] - small.growth_kib[name]
        base = small.growth_kib[name]
        # Growth of a few hundred KiB is allocator noise: a ratio of it would mean nothing.
        ratio = f"{big.growth_kib[name] / base:.2f}x" if base >= 1024 else "n/a (small < 1 MiB)"
        print(f"  {name:<10} peak RSS growth big vs small: {extra / 1024:+.1f} MiB, ratio {ratio}")
    print(
        f"big upload throughput: client -> dispatcher {big.upload_mb_s:.0f} MB/s "
        f"(spooled + probed), dispatcher -> node {big.to_node_mb_s:.0f} MB/s (spooled); "
        f"whole task with the ffmpeg job: {big.total_s:.1f} s"
    )


# -- main --------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--big-mb",
        type=float,
        default=300.0,
        help="size of the big video in MB (default 300; under the 2 GiB limit)",
    )
    p.add_argument(
        "--small-mb", type=float, default=1.0, help="size of the small video in MB (default 1)"
    )
    return p.parse_args()


def prepare_media(small_mb: float, big_mb: float) -> tuple[Path, Path, Path]:
    CACHE_DIR.mkdir(exist_ok=True)
    started = time.monotonic()
    audio = make_audio(CACHE_DIR / f"audio-{AUDIO_SECONDS}s.mp3")
    small = make_video(CACHE_DIR / f"video-{small_mb:g}MB.mp4", small_mb, "320x240")
    # Few pixels per frame: the node re-encodes 2 s of it, and x264 on noise is slow.
    big = make_video(CACHE_DIR / f"video-{big_mb:g}MB.mp4", big_mb, "640x360")
    print(f"media in {CACHE_DIR} (ready in {time.monotonic() - started:.1f} s):")
    for path in (audio, small, big):
        info = probe(path)
        print(
            f"  {path.name:<22} {path.stat().st_size / MB:>8.1f} MB  "
            f"{info.duration_s:5.2f} s  {info.format_name.split(',')[0]}"
        )
    return audio, small, big


def main() -> None:
    args = parse_args()
    audio, small, big = prepare_media(args.small_mb, args.big_mb)
    with tempfile.TemporaryDirectory(prefix="heygem-stream-memory-") as tmp:
        dispatcher, node = start_fleet(Path(tmp))
        try:
            wait_node_accepting(dispatcher)
            # One client for the whole run: httpx.get would build a new client (and SSL
            # context) for every poll, and that churn grows this process with the duration.
            with httpx.Client() as client:
                # The first task pays one-time costs (lazy imports, connection pools, PyAV
                # codecs); it is shown but kept out of the comparison.
                rows = [
                    measure(client, label, dispatcher, node, audio, video)
                    for label, video in (("warm-up", small), ("small", small), ("big", big))
                ]
        finally:
            dispatcher.stop()
            node.stop()
    print()
    print_table(rows)
    print_ratios(rows[1], rows[2])


if __name__ == "__main__":
    main()
