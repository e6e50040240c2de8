"""The task routes: submit, follow, fetch, cancel, retry. Thin: parse, call, shape JSON."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from dispatcher.deps import EngineDep
from dispatcher.engine import Engine, TaskNotFound, TaskStateConflict, iso
from dispatcher.states import TaskStatus
from dispatcher.store import Task
from dispatcher.submit import SubmitError, place_files, receive

router = APIRouter(tags=["tasks"])

_FORM_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "audio_file": {
                            "type": "string",
                            "format": "binary",
                            "description": "the speech (or send it as 'audio')",
                        },
                        "video_file": {
                            "type": "string",
                            "format": "binary",
                            "description": "the face video (or send it as 'video')",
                        },
                        "description": {"type": "string"},
                        "callback_url": {
                            "type": "string",
                            "description": "POSTed JSON when the task ends",
                        },
                        "progress_callbacks": {
                            "type": "boolean",
                            "description": "also POST progress updates",
                        },
                        "task_id": {
                            "type": "string",
                            "description": "your own id; a repeat returns the task",
                        },
                        "priority": {"type": "integer", "description": "higher starts first"},
                        "expires_in": {
                            "type": "number",
                            "description": "seconds to start within, else failed",
                        },
                        "stall_timeout": {"type": "number"},
                        "task_timeout": {"type": "number"},
                        "max_attempts": {"type": "integer"},
                        "options": {"type": "string", "description": "JSON for the model"},
                        "chaofen": {"type": "integer"},
                        "watermark_switch": {"type": "integer"},
                        "pn": {"type": "integer"},
                    },
                }
            }
        },
    }
}


def task_view(
    engine: Engine, task: Task, queue: dict[str, tuple[int, float]] | None = None
) -> dict[str, Any]:
    position, eta = None, None
    if task.status is TaskStatus.PENDING:
        position, eta_ts = (queue if queue is not None else engine.queue_view()).get(
            task.id, (None, None)
        )
        eta = iso(eta_ts)
    elif task.status is TaskStatus.PROCESSING:
        eta = iso(engine.running_eta(task))
    has_result = task.status is TaskStatus.COMPLETED and not task.files_expired
    return {
        "task_id": task.id,
        "status": task.status.value,
        "description": task.description,
        "progress": round(task.progress, 1),
        "stage": task.stage,
        "message": task.message,
        "error_message": task.error_message,
        "queue_position": position,
        "eta": eta,
        "node": task.node,
        "priority": task.priority,
        "attempts": task.attempts,
        "max_attempts": task.max_attempts,
        "media_seconds": task.media_seconds,
        "created_at": iso(task.created_at),
        "started_at": iso(task.started_at),
        "completed_at": iso(task.completed_at),
        "updated_at": iso(task.updated_at),
        "expires_at": iso(task.expires_at),
        "result_url": f"/tasks/{task.id}/result" if has_result else None,
        "result_size": task.result_size if has_result else None,
        "files_expired": task.files_expired,
        "callback_url": task.callback_url,
        "attempt_log": task.attempt_log,
    }


def _task_or_404(engine: Engine, task_id: str) -> Task:
    task = engine.store.get(task_id)
    if task is None:
        raise HTTPException(404, f"task not found: {task_id}")
    return task


async def _create(request: Request, engine: Engine, idempotency_key: str | None) -> Task:
    settings = engine.settings
    if idempotency_key:
        existing = engine.store.by_idempotency_key(idempotency_key)
        if existing is not None:
            return existing
    free = shutil.disk_usage(settings.data_dir).free
    if free < settings.min_free_disk_bytes:
        raise HTTPException(
            507,
            f"the dispatcher's disk is nearly full ({free} bytes free); "
            "try again once old results have expired",
        )
    try:
        task, staging = await receive(
            settings,
            request.headers.get("content-type", ""),
            request.stream(),
            engine.clock(),
            idempotency_key,
        )
    except SubmitError as exc:
        raise HTTPException(exc.status, exc.message) from None
    # Checked again after the upload: a twin request may have been stored meanwhile. From
    # here to the insert nothing awaits, so no other request can slip in between.
    existing = engine.store.get(task.id)
    if existing is None and idempotency_key:
        existing = engine.store.by_idempotency_key(idempotency_key)
    if existing is not None:  # the first one stands
        shutil.rmtree(staging, ignore_errors=True)
        return existing
    place_files(staging, task)
    return engine.submit(task)


@router.post(
    "/tasks", openapi_extra=_FORM_DOC, summary="Submit a task (multipart: audio_file + video_file)"
)
async def create_task(
    request: Request,
    engine: EngineDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> dict[str, Any]:
    task = await _create(request, engine, idempotency_key)
    return {**task_view(engine, task), "task_id": task.id, "status": task.status.value}


@router.post(
    "/tasks/sync",
    openapi_extra=_FORM_DOC,
    response_class=FileResponse,
    summary="Submit and wait: answers with the finished video's bytes",
)
async def create_task_sync(
    request: Request,
    engine: EngineDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> FileResponse:
    task = await _create(request, engine, idempotency_key)
    task = await engine.wait_terminal(task.id, engine.settings.sync_timeout_s)
    headers = {"X-Task-Id": task.id}
    if task.status is TaskStatus.COMPLETED and task.result_path and not task.files_expired:
        return FileResponse(
            task.result_path, media_type="video/mp4", filename=f"{task.id}.mp4", headers=headers
        )
    if not task.status.terminal:
        waited = engine.settings.sync_timeout_s
        raise HTTPException(
            504,
            f"task {task.id} is still {task.status.value} after "
            f"{waited:.0f}s; poll GET /tasks/{task.id}",
            headers=headers,
        )
    # A cancel is somebody's decision, not a failure of the fleet.
    status = 409 if task.status is TaskStatus.CANCELLED else 502
    raise HTTPException(
        status, f"task {task.id} {task.status.value}: {task.error_message}", headers=headers
    )


@router.get("/tasks", summary="List tasks, newest first")
async def list_tasks(
    engine: EngineDep,
    status: TaskStatus | None = None,
    since: Annotated[float | None, Query(description="unix time; tasks created since")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
    ids: Annotated[str | None, Query(description="comma-separated ids (batch status)")] = None,
) -> dict[str, Any]:
    if ids is not None:
        return _batch(engine, [i for i in ids.split(",") if i])
    found, total = engine.store.page(status, since, limit, offset)
    queue = engine.queue_view()
    return {
        "tasks": [task_view(engine, t, queue) for t in found],
        "total": total,
        "limit": limit,
        "offset": offset,
    }


class BatchQuery(BaseModel):
    task_ids: list[str] = Field(min_length=1, max_length=1000)


def _batch(engine: Engine, task_ids: list[str]) -> dict[str, Any]:
    found = engine.store.get_many(task_ids)
    queue = engine.queue_view()
    return {
        "tasks": [task_view(engine, found[i], queue) for i in task_ids if i in found],
        "unknown": [i for i in task_ids if i not in found],
    }


@router.post("/tasks/batch", summary="Status of many tasks at once; unknown ids listed")
async def batch_status(query: BatchQuery, engine: EngineDep) -> dict[str, Any]:
    return _batch(engine, query.task_ids)


@router.get("/tasks/{task_id}", summary="Status, progress, queue position and ETA")
async def get_task(task_id: str, engine: EngineDep) -> dict[str, Any]:
    task = _task_or_404(engine, task_id)
    # Whether the terminal callback got through, and if not why: asked often by users.
    callbacks = [
        {**row, **{k: iso(row[k]) for k in ("next_attempt_at", "delivered_at", "gave_up_at")}}
        for row in engine.store.callbacks_for(task_id)
    ]
    return {**task_view(engine, task), "callbacks": callbacks}


@router.get("/tasks/{task_id}/result", response_class=FileResponse, summary="The finished video")
async def get_result(task_id: str, engine: EngineDep) -> FileResponse:
    task = _task_or_404(engine, task_id)
    if task.status is not TaskStatus.COMPLETED:
        raise HTTPException(
            409,
            f"task {task_id} has no result: it is {task.status.value}"
            + (f" ({task.error_message})" if task.error_message else ""),
        )
    if task.files_expired or not task.result_path or not Path(task.result_path).is_file():
        raise HTTPException(410, f"the result of task {task_id} was deleted by retention")
    return FileResponse(task.result_path, media_type="video/mp4", filename=f"{task_id}.mp4")


@router.delete("/tasks/{task_id}", summary="Cancel a queued or running task")
async def cancel_task(task_id: str, engine: EngineDep) -> dict[str, Any]:
    try:
        task = await engine.cancel(task_id)
    except TaskNotFound:
        raise HTTPException(404, f"task not found: {task_id}") from None
    except TaskStateConflict as exc:
        raise HTTPException(409, str(exc)) from None
    return task_view(engine, task)


@router.post("/tasks/{task_id}/retry", summary="Queue a failed or cancelled task again")
async def retry_task(task_id: str, engine: EngineDep) -> dict[str, Any]:
    try:
        task = engine.retry(task_id)
    except TaskNotFound:
        raise HTTPException(404, f"task not found: {task_id}") from None
    except TaskStateConflict as exc:
        raise HTTPException(409, str(exc)) from None
    return task_view(engine, task)
