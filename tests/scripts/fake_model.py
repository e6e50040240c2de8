"""A stand-in lip-sync model for the command backend's tests: a real process, real media.

It prints progress the way models do (plain lines on stdout, tqdm-style ``\\r`` updates on
stderr), muxes one second of the input video with the input audio using imageio-ffmpeg's
ffmpeg, and can misbehave on request.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import imageio_ffmpeg


def main() -> int:
    args = _parse_args()
    if args.pid_file:
        Path(args.pid_file).write_text(str(_spawn_child_and_pids()))
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.hang:
        print("progress: 10%", flush=True)
        time.sleep(600)
    if args.fail is not None:
        for n in range(1, 16):
            print(f"error line {n}", file=sys.stderr)
        print("progress: 30%", flush=True)
        return args.fail
    print("loading model", flush=True)
    print("progress: 10%", flush=True)
    sys.stderr.write("progress: 25%\rprogress: 40%\r")
    sys.stderr.flush()
    if not args.no_output:
        _encode(args.video, args.audio, args.output)
    print("progress: 90%", flush=True)
    print("progress: 250%", flush=True)  # silly models exist; the backend clamps
    return 0


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--audio", required=True)
    parser.add_argument("--video", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--fail", type=int, help="exit with this status after 15 stderr lines")
    parser.add_argument("--no-output", action="store_true", help="exit 0 without writing")
    parser.add_argument("--hang", action="store_true", help="sleep for ten minutes")
    parser.add_argument("--ignore-term", action="store_true", help="ignore SIGTERM")
    parser.add_argument("--pid-file", help="write '<own pid> <child pid>' here")
    return parser.parse_args()


def _spawn_child_and_pids() -> str:
    # A grandchild of the backend, like the ffmpeg a model shells out to: it must die too.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    return f"{os.getpid()} {child.pid}"


def _encode(video: str, audio: str, output: str) -> None:
    subprocess.run(
        [
            imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
            "-i", video, "-i", audio, "-t", "1", "-map", "0:v:0", "-map", "1:a:0",
            "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
            "-c:a", "aac", output,
        ],
        check=True,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
