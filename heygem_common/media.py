"""What is inside a media file, read with PyAV (no ffprobe binary needed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import imageio_ffmpeg


class NotMedia(ValueError):
    """The file is not audio or video we can read; the message says why."""


@dataclass(frozen=True)
class MediaInfo:
    duration_s: float
    video_streams: int
    audio_streams: int
    format_name: str


def probe(path: Path) -> MediaInfo:
    """Read the container header and, if needed, the packets to learn the duration."""
    try:
        with av.open(str(path)) as container:
            duration = _duration_s(container)
            return MediaInfo(
                duration_s=duration,
                video_streams=len(container.streams.video),
                audio_streams=len(container.streams.audio),
                format_name=container.format.name,
            )
    except av.error.FFmpegError as exc:
        raise NotMedia(f"not a readable media file ({exc.strerror or exc})") from exc


def _duration_s(container: av.container.InputContainer) -> float:
    if container.duration is not None and container.duration > 0:
        return float(container.duration / av.time_base)
    # Some streams (raw ADTS, broken headers) carry no duration: demux and take the last pts.
    end = 0.0
    for packet in container.demux():
        if packet.pts is not None and packet.time_base is not None:
            packet_end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
            end = max(end, packet_end)
    return end


def require_audio(path: Path, label: str) -> MediaInfo:
    info = probe(path)
    if info.audio_streams == 0:
        raise NotMedia(f"{label} has no audio stream")
    if info.duration_s <= 0:
        raise NotMedia(f"{label} has no measurable duration")
    return info


def require_video(path: Path, label: str) -> MediaInfo:
    info = probe(path)
    if info.video_streams == 0:
        raise NotMedia(f"{label} has no video stream")
    return info


def ffmpeg_exe() -> str:
    """The ffmpeg binary shipped by the imageio-ffmpeg wheel (or $IMAGEIO_FFMPEG_EXE)."""
    return imageio_ffmpeg.get_ffmpeg_exe()
