"""Make the small sample inputs in samples/input/ with the ffmpeg binary from imageio-ffmpeg.

    python samples/make_samples.py

audio.mp3: 6 s of a warbling tone (a stand-in for speech). video.mp4: 2.5 s, 320x240 at
25 fps, no audio, shorter than the audio on purpose so the ffmpeg backend has to loop it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import imageio_ffmpeg

HERE = Path(__file__).resolve().parent / "input"
AUDIO_SECONDS = 6.0
VIDEO_SECONDS = 2.5


def make_audio(path: Path, seconds: float = AUDIO_SECONDS) -> None:
    tone = f"aevalsrc='0.4*sin(2*PI*(220+60*sin(2*PI*3*t))*t)':s=22050:d={seconds}"
    _ffmpeg("-f", "lavfi", "-i", tone, "-c:a", "libmp3lame", "-b:a", "64k", str(path))


def make_video(path: Path, seconds: float = VIDEO_SECONDS) -> None:
    source = f"testsrc2=size=320x240:rate=25:duration={seconds}"
    _ffmpeg(
        "-f", "lavfi", "-i", source,
        "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-an", str(path),
    )  # fmt: skip


def _ffmpeg(*args: str) -> None:
    exe = imageio_ffmpeg.get_ffmpeg_exe()
    subprocess.run([exe, "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


if __name__ == "__main__":
    HERE.mkdir(parents=True, exist_ok=True)
    make_audio(HERE / "audio.mp3")
    make_video(HERE / "video.mp4")
    for name in ("audio.mp3", "video.mp4"):
        print(f"{HERE / name}: {(HERE / name).stat().st_size} bytes")
