"""The node agent's HTTP API: the small protocol the dispatcher speaks (shared/DESIGN.md).

GET    /health               backend, slots, running jobs, GPU
POST   /jobs?job_id=ID       multipart audio + video (+ options JSON); 409 when full;
                             200 with the existing job for a known id (idempotent)
GET    /jobs/{id}            state, progress, message, error; with ?wait_s=&seen_state=
                             &seen_progress= a long poll that answers when the job moves
GET    /jobs/{id}/result     the finished mp4, streamed
DELETE /jobs/{id}            cancel if running, then forget it and its files (409 while
                             its upload is still being received)
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from heygem_common.forms import FormError, json_object_field, spool_form
from node_agent import __version__
from node_agent.backends import build_backend
from node_agent.backends.base import Backend, BackendHealth
from node_agent.gpu import read_gpus
from node_agent.jobs import JOB_ID_PATTERN, Job, JobManager, JobState, NoFreeSlot, UnknownJob
from node_agent.settings import NodeSettings

log = structlog.get_logger()
HEALTH_PROBE_INTERVAL_S = 5.0
SWEEP_INTERVAL_S = 300.0


@dataclass
class NodeState:
    settings: NodeSettings
    manager: JobManager
    backend_health: BackendHealth = field(default_factory=lambda: BackendHealth(ok=True))
    gpus: list[dict[str, Any]] | None = None


def _state(request: Request) -> NodeState:
    state: NodeState = request.app.state.node
    return state


def _check_token(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    token = _state(request).settings.token
    if not token:
        return
    supplied = (authorization or "").removeprefix("Bearer ").strip()
    if not secrets.compare_digest(supplied.encode(), token.encode()):
        raise HTTPException(401, "missing or wrong node token (Authorization: Bearer …)")


State = Annotated[NodeState, Depends(_state)]
router = APIRouter(dependencies=[Depends(_check_token)])


@router.get("/health")
async def health(node: State) -> dict[str, Any]:
    manager = node.manager
    if not node.backend_health.ok:
        status = "unhealthy"
    elif manager.free_slots == 0 or manager.model_busy():
        status = "busy"
    else:
        status = "ready"
    return {
        "status": status,
        "name": node.settings.display_name,
        "version": __version__,
        "backend": manager.backend.name,
        "backend_ok": node.backend_health.ok,
        "backend_detail": node.backend_health.detail,
        "max_concurrent": manager.max_concurrent,
        "free_slots": manager.free_slots,
        "running": manager.running_ids(),
        "jobs": {j.job_id: j.state.value for j in manager.jobs.values()},
        "peak_running": manager.peak_running,
        "jobs_done": manager.jobs_done,
        "jobs_failed": manager.jobs_failed,
        "gpus": node.gpus,
    }


@router.post("/jobs")
async def create_job(
    request: Request, node: State, job_id: Annotated[str, Query(pattern=JOB_ID_PATTERN.pattern)]
) -> JSONResponse:
    manager = node.manager
    known = manager.jobs.get(job_id)
    if known is not None and known.state is JobState.RECEIVING:
        # The first upload of this id is still arriving (or dying): nothing runs yet.
        raise HTTPException(409, f"job '{job_id}' is still being received")
    if known is not None:  # a retried POST after a lost answer: same job, no new work
        return JSONResponse(known.public())
    try:
        job = manager.reserve(job_id, {})
    except NoFreeSlot:
        raise HTTPException(409, "no free slot on this node") from None
    try:
        form = await spool_form(
            request.headers.get("content-type", ""),
            request.stream(),
            manager.job_dir(job_id),
            file_fields=frozenset({"audio", "video"}),
            max_bytes=node.settings.max_upload_bytes,
        )
        audio, video = form.files.get("audio"), form.files.get("video")
        if audio is None or video is None:
            raise FormError(400, "a job needs both an 'audio' and a 'video' file")
        job.options = json_object_field(form, "options")
    except FormError as exc:
        manager.abandon(job_id)
        raise HTTPException(exc.status, exc.message) from None
    except BaseException:
        manager.abandon(job_id)  # client went away mid-upload: free the slot
        raise
    manager.start(job, audio.path, video.path)
    return JSONResponse(job.public(), status_code=201)


def _job(node: NodeState, job_id: str) -> Job:
    try:
        return node.manager.get(job_id)
    except UnknownJob:
        raise HTTPException(404, f"no job '{job_id}' on this node") from None


@router.get("/jobs/{job_id}")
async def job_status(
    node: State,
    job_id: str,
    wait_s: Annotated[float, Query(ge=0, le=60, description="long poll: wait for a change")] = 0,
    seen_state: str | None = None,
    seen_progress: float | None = None,
) -> dict[str, Any]:
    """The job as it is; with ``wait_s``, as soon as it differs from what the caller saw."""
    job = _job(node, job_id)
    unchanged = job.state.value == seen_state and job.progress == seen_progress
    if wait_s > 0 and unchanged and job.state.holds_slot:
        await node.manager.wait_for_change(job_id, wait_s)
        job = _job(node, job_id)  # it may have been forgotten meanwhile: then 404
    # Tells the dispatcher it may ask again at once: this node waits for news itself.
    return {**job.public(), "long_poll": True}


@router.get("/jobs/{job_id}/result")
async def job_result(node: State, job_id: str) -> FileResponse:
    job = _job(node, job_id)
    if job.state is not JobState.SUCCEEDED:
        raise HTTPException(409, f"job '{job_id}' has no result: it is {job.state.value}")
    return FileResponse(node.manager.result_path(job_id), media_type="video/mp4")


@router.delete("/jobs/{job_id}")
async def delete_job(node: State, job_id: str) -> dict[str, Any]:
    job = _job(node, job_id)
    if job.state is JobState.RECEIVING:
        # Its upload still writes into the folder; forgetting it now would free the slot
        # for a second upload of the same id. The upload ends (or is abandoned) soon.
        raise HTTPException(409, f"job '{job_id}' is still being received")
    await node.manager.forget(job_id)
    return {**job.public(), "forgotten": True}


async def _probe_forever(node: NodeState) -> None:
    while True:
        try:
            node.backend_health = await node.manager.backend.probe()
            node.gpus = await read_gpus()
        except Exception as exc:  # a failing probe is a finding, not a crash
            node.backend_health = BackendHealth(ok=False, detail=f"probe failed: {exc!r}")
        await asyncio.sleep(HEALTH_PROBE_INTERVAL_S)


async def _sweep_forever(node: NodeState) -> None:
    while True:
        await asyncio.sleep(SWEEP_INTERVAL_S)
        node.manager.sweep(node.settings.job_retention_s)


def create_app(settings: NodeSettings, backend: Backend | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager = JobManager(
            backend or build_backend(settings), settings.data_dir, settings.max_concurrent
        )
        manager.restore()
        node = NodeState(settings, manager)
        app.state.node = node
        loops = [
            asyncio.create_task(_probe_forever(node)),
            asyncio.create_task(_sweep_forever(node)),
        ]
        log.info(
            "node agent ready",
            backend=manager.backend.name,
            max_concurrent=settings.max_concurrent,
            name=settings.display_name,
        )
        try:
            yield
        finally:
            for loop in loops:
                loop.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop
            await manager.shutdown()
            await manager.backend.aclose()

    app = FastAPI(title="Multi-HeyGem node agent", version=__version__, lifespan=lifespan)
    app.include_router(router)
    return app
