"""Turning a multipart submit into a stored task: spool, validate, insert — or leave nothing.

Field names follow seed 001: ``audio_file`` / ``video_file`` (its async sample) and ``audio``
/ ``video`` (its sync sample), ``description``, ``callback_url``. Beyond the seed: ``task_id``
(idempotent submit), ``priority``, ``expires_in``, ``stall_timeout``, ``task_timeout``,
``max_attempts`` and model options (``options`` JSON and HeyGem's ``chaofen``,
``watermark_switch``, ``pn``, ``digital_auth``).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dispatcher.settings import DispatcherSettings
from dispatcher.states import TaskStatus
from dispatcher.store import Task
from heygem_common.forms import (
    FormError,
    SpooledForm,
    UploadedFile,
    json_object_field,
    spool_form,
)
from heygem_common.media import NotMedia, require_audio, require_video

AUDIO_FIELDS = ("audio_file", "audio")
VIDEO_FIELDS = ("video_file", "video")
TASK_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MODEL_FLAGS = ("chaofen", "watermark_switch", "pn", "digital_auth")


class SubmitError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Submission:
    task: Task
    existing: bool  # an earlier task with the same id / idempotency key


def check_callback_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SubmitError(400, f"callback_url must be an absolute http(s) URL, got {url!r}")
    return url


def _number(form: SpooledForm, name: str, cast: type, low: float, high: float) -> Any:
    raw = form.first_field(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = cast(raw)
    except ValueError:
        raise SubmitError(400, f"{name} must be a number, got {raw!r}") from None
    if not low <= value <= high:
        raise SubmitError(400, f"{name} must be between {low:g} and {high:g}, got {value}")
    return value


def _flag(form: SpooledForm, name: str) -> bool:
    raw = (form.first_field(name) or "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise SubmitError(400, f"{name} must be true or false, got {raw!r}")


def _options(form: SpooledForm) -> dict[str, Any]:
    options = json_object_field(form, "options")
    for flag in MODEL_FLAGS:
        value = _number(form, flag, int, 0, 1)
        if value is not None:
            options[flag] = value
    return options


def _require_file(form: SpooledForm, names: tuple[str, ...], kind: str) -> UploadedFile:
    upload = form.first_file(*names)
    if upload is None:
        raise SubmitError(400, f"missing the {kind} file: send it as '{names[0]}' or '{names[1]}'")
    if upload.size == 0:
        raise SubmitError(400, f"the {kind} file '{upload.filename}' is empty")
    return upload


async def _validate_media(audio: UploadedFile, video: UploadedFile) -> float:
    try:
        info = await asyncio.to_thread(require_audio, audio.path, f"the audio '{audio.filename}'")
        await asyncio.to_thread(require_video, video.path, f"the video '{video.filename}'")
    except NotMedia as exc:
        raise SubmitError(415, str(exc)) from None
    return info.duration_s


def new_task_id() -> str:
    return uuid.uuid4().hex


async def receive(
    settings: DispatcherSettings,
    content_type: str,
    body: AsyncIterator[bytes],
    now: float,
    idempotency_key: str | None,
) -> tuple[Task, Path]:
    """Spool and validate an upload; return the task to insert and its final folder.

    On any error nothing is left on disk.
    """
    staging = settings.uploads_dir / f".incoming-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:
        form = await spool_form(
            content_type,
            body,
            staging,
            file_fields=frozenset(AUDIO_FIELDS + VIDEO_FIELDS),
            max_bytes=settings.max_upload_bytes,
        )
        task = await _build_task(settings, form, now, idempotency_key)
    except FormError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise SubmitError(exc.status, exc.message) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return task, staging


async def _build_task(
    settings: DispatcherSettings, form: SpooledForm, now: float, idempotency_key: str | None
) -> Task:
    task_id = (form.first_field("task_id") or "").strip() or new_task_id()
    if not TASK_ID_PATTERN.match(task_id):
        raise SubmitError(400, "task_id must be 1-64 letters, digits, '-' or '_'")
    callback_url = (form.first_field("callback_url") or "").strip() or None
    if callback_url:
        check_callback_url(callback_url)
    options = _options(form)
    expires_in = _number(form, "expires_in", float, 1, 30 * 86400)
    audio = _require_file(form, AUDIO_FIELDS, "audio")
    video = _require_file(form, VIDEO_FIELDS, "video")
    media_seconds = await _validate_media(audio, video)
    final = settings.uploads_dir / task_id
    return Task(
        id=task_id,
        status=TaskStatus.PENDING,
        audio_path=str(final / audio.path.name),
        video_path=str(final / video.path.name),
        audio_name=audio.filename,
        video_name=video.filename,
        max_attempts=_number(form, "max_attempts", int, 1, 20) or settings.max_attempts,
        created_at=now,
        enqueued_at=now,
        updated_at=now,
        priority=_number(form, "priority", int, -1000, 1000) or 0,
        description=form.first_field("description") or "",
        callback_url=callback_url,
        progress_callbacks=_flag(form, "progress_callbacks"),
        options=options,
        idempotency_key=idempotency_key,
        media_seconds=media_seconds,
        stall_timeout_s=_number(form, "stall_timeout", float, 1, 7 * 86400),
        task_timeout_s=_number(form, "task_timeout", float, 1, 7 * 86400),
        expires_at=now + expires_in if expires_in else None,
        message="queued",
    )


def place_files(staging: Path, task: Task) -> None:
    """Move the validated upload to the task's folder (same filesystem: a rename)."""
    final = Path(task.audio_path).parent
    staging.rename(final)
    # The rename itself is durable only once the parent folder is synced.
    folder = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
