"""The node agent's HTTP API, in process, over the scripted backend of test_node_jobs.py.

httpx's ASGITransport does not run the lifespan, so ``node_agent()`` enters it itself: the
JobManager, the restore of old jobs and the health probe all start as in production.
Uploads can be streamed from a ``Body`` that records whether the server read it, so "409
before reading the upload" is checked directly, and that can pause mid-upload, so requests
can meet a job that is still being received.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from node_agent import __version__
from node_agent.app import create_app
from node_agent.backends.base import BackendBusy, BackendError, BackendHealth
from node_agent.jobs import JobManager
from node_agent.settings import NodeSettings
from tests.test_node_jobs import (
    RESULT_BYTES,
    ScriptedBackend,
    cancel_stray_runs,
    report,
    until,
)

pytestmark = pytest.mark.anyio

TOKEN = "node-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Node:
    app: FastAPI
    client: httpx.AsyncClient
    backend: ScriptedBackend
    data_dir: Path

    @property
    def manager(self) -> JobManager:
        manager: JobManager = self.app.state.node.manager
        return manager

    def folders(self) -> set[str]:
        root = self.data_dir / "jobs"
        return {p.name for p in root.iterdir()} if root.is_dir() else set()

    async def health(self) -> dict[str, Any]:
        response = await self.client.get("/health")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def state_of(self, job_id: str) -> str:
        response = await self.client.get(f"/jobs/{job_id}")
        assert response.status_code == 200, response.text
        state: str = response.json()["state"]
        return state

    async def wait_state(self, job_id: str, state: str) -> None:
        await until(lambda: self.manager.get(job_id).state == state, f"{job_id} {state}")


@asynccontextmanager
async def node_agent(
    data_dir: Path,
    token: str = TOKEN,
    backend: ScriptedBackend | None = None,
    raise_app_exceptions: bool = True,
) -> AsyncIterator[Node]:
    backend = backend or ScriptedBackend()
    settings = NodeSettings(data_dir=data_dir, max_concurrent=1, token=token)
    app = create_app(settings, backend=backend)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://node", headers=AUTH) as client,
    ):
        yield Node(app, client, backend, data_dir)


def form(
    audio: bytes | None = b"fake audio",
    video: bytes | None = b"fake video",
    options: str | None = None,
) -> dict[str, Any]:
    """Keyword arguments for client.post: a multipart upload (the bytes need not be media)."""
    files = {}
    if audio is not None:
        files["audio"] = ("voice.mp3", audio, "audio/mpeg")
    if video is not None:
        files["video"] = ("face.mp4", video, "video/mp4")
    return {"files": files, "data": {} if options is None else {"options": options}}


class Body:
    """A multipart body streamed to the server, which may stop after ``pause_after`` bytes."""

    def __init__(self, pause_after: int | None = None, **fields: Any) -> None:
        request = httpx.Request("POST", "http://node", **form(**fields))
        self.content_type = request.headers["content-type"]
        self.data = request.read()
        self.pause_after = len(self.data) if pause_after is None else pause_after
        self.resume = asyncio.Event()
        self.read = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.read = True
        yield self.data[: self.pause_after]
        if self.pause_after < len(self.data):
            await self.resume.wait()
            yield self.data[self.pause_after :]


async def post_body(node: Node, job_id: str, body: Body) -> httpx.Response:
    return await node.client.post(
        "/jobs",
        params={"job_id": job_id},
        content=body,
        headers={"content-type": body.content_type},
    )


async def post_job(node: Node, job_id: str, **fields: Any) -> httpx.Response:
    return await node.client.post("/jobs", params={"job_id": job_id}, **form(**fields))


async def run_job(node: Node, job_id: str) -> None:
    response = await post_job(node, job_id)
    assert response.status_code == 201, response.text
    await until(lambda: job_id in node.backend.active, f"{job_id} to start")


# -- POST /jobs ------------------------------------------------------------------------------
async def test_post_creates_a_job_and_a_repeat_answers_the_same_job(tmp_path: Path) -> None:
    async with node_agent(tmp_path) as node:
        created = await post_job(node, "job-1", options='{"chaofen": 1}')
        assert created.status_code == 201, created.text
        assert created.json()["job_id"] == "job-1"
        assert created.json()["state"] == "running"
        assert created.json()["options"] == {"chaofen": 1}
        await until(lambda: "job-1" in node.backend.active, "the run to start")
        assert node.backend.specs["job-1"].options == {"chaofen": 1}

        # A retried POST after a lost answer: no upload read, no second run.
        body = Body()
        again = await post_body(node, "job-1", body)
        assert again.status_code == 200, again.text
        assert again.json()["job_id"] == "job-1"
        assert again.json()["created_at"] == created.json()["created_at"]
        assert not body.read
        assert node.backend.started == ["job-1"]


async def test_a_full_node_answers_409_without_reading_the_upload(tmp_path: Path) -> None:
    async with node_agent(tmp_path) as node:
        await run_job(node, "first")
        body = Body()
        response = await post_body(node, "second", body)
        assert response.status_code == 409
        assert response.json()["detail"] == "no free slot on this node"
        assert not body.read
        assert node.folders() == {"first"}
        assert node.backend.started == ["first"]


async def test_a_busy_model_makes_the_node_refuse_new_jobs(tmp_path: Path) -> None:
    async with node_agent(tmp_path) as node:
        await run_job(node, "a")
        node.backend.fail("a", BackendBusy("model is busy (10001)"))
        await node.wait_state("a", "failed")
        job = (await node.client.get("/jobs/a")).json()
        assert (job["error"], job["error_kind"]) == ("model is busy (10001)", "busy")
        health = await node.health()
        assert (health["status"], health["free_slots"]) == ("busy", 1)
        response = await post_job(node, "b")
        assert response.status_code == 409


@pytest.mark.parametrize("job_id", ["../x", "a/b", ".hidden", "-flag", "a b", "", "x" * 129])
async def test_a_job_id_that_is_not_a_plain_name_is_refused(tmp_path: Path, job_id: str) -> None:
    async with node_agent(tmp_path) as node:
        body = Body()
        response = await post_body(node, job_id, body)
        assert response.status_code == 422, response.text
        assert not body.read
        assert node.folders() == set()
        assert (await node.health())["free_slots"] == 1


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        ({"audio": None}, "a job needs both an 'audio' and a 'video' file"),
        ({"video": None}, "a job needs both an 'audio' and a 'video' file"),
        ({"options": "[1, 2]"}, "options must be a JSON object"),
        ({"options": '"fast"'}, "options must be a JSON object"),
        ({"options": "{not json"}, "options must be a JSON object: "),
    ],
    ids=["no-audio", "no-video", "options-list", "options-string", "options-not-json"],
)
async def test_a_bad_upload_answers_400_and_leaves_nothing_behind(
    tmp_path: Path, fields: dict[str, Any], detail: str
) -> None:
    async with node_agent(tmp_path) as node:
        response = await post_job(node, "bad", **fields)
        assert response.status_code == 400, response.text
        assert response.json()["detail"].startswith(detail)
        assert node.folders() == set()
        assert (await node.health())["free_slots"] == 1
        assert node.backend.started == []
        # The slot and the id are free again: the corrected upload goes through.
        assert (await post_job(node, "bad")).status_code == 201


async def test_a_second_post_while_the_first_is_uploading_is_refused(tmp_path: Path) -> None:
    async with node_agent(tmp_path) as node:
        body = Body(pause_after=100)
        upload = asyncio.create_task(post_body(node, "a", body))
        await until(lambda: "a" in node.manager.jobs, "the upload to begin")
        health = await node.health()
        assert (health["free_slots"], health["jobs"]) == (0, {"a": "receiving"})
        again = await post_job(node, "a")
        assert again.status_code == 409
        assert again.json()["detail"] == "job 'a' is still being received"
        body.resume.set()
        assert (await upload).status_code == 201
        assert body.read and node.backend.started == ["a"]


async def test_delete_during_the_upload_gives_the_uploader_a_clear_answer(
    tmp_path: Path,
) -> None:
    async with node_agent(tmp_path, raise_app_exceptions=False) as node:
        body = Body(pause_after=100)
        upload = asyncio.create_task(post_body(node, "a", body))
        await until(lambda: "a" in node.manager.jobs, "the upload to begin")
        deleted = await node.client.delete("/jobs/a")
        body.resume.set()
        response = await upload
        assert deleted.status_code in (200, 409)
        assert response.status_code < 500, response.text


async def test_a_job_deleted_mid_upload_and_posted_again_runs_once(tmp_path: Path) -> None:
    async with node_agent(tmp_path, raise_app_exceptions=False) as node:
        body = Body(pause_after=100)
        upload = asyncio.create_task(post_body(node, "a", body))
        await until(lambda: "a" in node.manager.jobs, "the upload to begin")
        await node.client.delete("/jobs/a")
        await post_job(node, "a")  # the dispatcher retrying the same id
        body.resume.set()
        await upload
        await asyncio.sleep(0)
        try:
            assert node.backend.started == ["a"]
            assert node.backend.peak_active <= 1
        finally:
            await cancel_stray_runs()


# -- GET /jobs/{id}, result, DELETE ----------------------------------------------------------
@pytest.mark.parametrize("suffix", ["", "/result"])
async def test_an_unknown_job_is_404_with_a_message(tmp_path: Path, suffix: str) -> None:
    async with node_agent(tmp_path) as node:
        response = await node.client.get(f"/jobs/nope{suffix}")
        assert response.status_code == 404
        assert response.json()["detail"] == "no job 'nope' on this node"
        assert (await node.client.delete("/jobs/nope")).status_code == 404


async def test_status_reports_progress_while_running(tmp_path: Path) -> None:
    async with node_agent(tmp_path) as node:
        await run_job(node, "a")
        node.backend.push("a", report(42, "lip-syncing"))
        await until(lambda: node.manager.get("a").progress == 42, "progress")
        job = (await node.client.get("/jobs/a")).json()
        assert (job["state"], job["progress"], job["message"]) == ("running", 42, "lip-syncing")


async def test_a_long_poll_answers_as_soon_as_the_job_moves(tmp_path: Path) -> None:
    async with node_agent(tmp_path) as node:
        await run_job(node, "a")
        node.backend.push("a", report(10, "lip-syncing"))
        await until(lambda: node.manager.get("a").progress == 10, "progress")
        seen = {"wait_s": 5, "seen_state": "running", "seen_progress": 10}

        # Something the caller has not seen yet: answered at once.
        stale = {**seen, "seen_progress": 5}
        assert (await node.client.get("/jobs/a", params=stale)).json()["progress"] == 10

        # Nothing new: the answer waits for the job to move ...
        started = time.monotonic()
        poll = asyncio.create_task(node.client.get("/jobs/a", params=seen))
        await asyncio.sleep(0.2)
        assert not poll.done()
        node.backend.succeed("a")
        job = (await poll).json()
        assert job["state"] == "succeeded" and job["long_poll"] is True
        assert time.monotonic() - started < 2.0

        # ... and a finished job is never waited on.
        done = {**seen, "seen_state": "succeeded", "seen_progress": 100}
        started = time.monotonic()
        assert (await node.client.get("/jobs/a", params=done)).json()["state"] == "succeeded"
        assert time.monotonic() - started < 1.0


async def test_a_long_poll_gives_up_after_wait_s(tmp_path: Path) -> None:
    async with node_agent(tmp_path) as node:
        await run_job(node, "a")
        params = {"wait_s": 0.3, "seen_state": "running", "seen_progress": 0}
        started = time.monotonic()
        job = (await node.client.get("/jobs/a", params=params)).json()
        assert job["state"] == "running" and 0.3 <= time.monotonic() - started < 2.0


async def test_the_result_of_an_unfinished_job_is_409(tmp_path: Path) -> None:
    async with node_agent(tmp_path) as node:
        await run_job(node, "a")
        running = await node.client.get("/jobs/a/result")
        assert running.status_code == 409
        assert running.json()["detail"] == "job 'a' has no result: it is running"
        node.backend.fail("a", BackendError("no face found"))
        await node.wait_state("a", "failed")
        failed = await node.client.get("/jobs/a/result")
        assert failed.status_code == 409
        assert (await node.client.get("/jobs/a")).json()["error"] == "no face found"


async def test_the_result_of_a_finished_job_is_the_file(tmp_path: Path) -> None:
    async with node_agent(tmp_path) as node:
        await run_job(node, "a")
        node.backend.succeed("a")
        await node.wait_state("a", "succeeded")
        response = await node.client.get("/jobs/a/result")
        assert response.status_code == 200
        assert response.headers["content-type"] == "video/mp4"
        assert response.content == RESULT_BYTES
        assert (await node.client.get("/jobs/a")).json()["result_size"] == len(RESULT_BYTES)


async def test_a_finished_result_survives_a_restart_and_a_running_job_does_not(
    tmp_path: Path,
) -> None:
    async with node_agent(tmp_path) as node:
        await run_job(node, "a")
        node.backend.succeed("a")
        await node.wait_state("a", "succeeded")
    async with node_agent(tmp_path) as node:
        assert (await node.client.get("/jobs/a/result")).content == RESULT_BYTES
        assert (await node.health())["jobs"] == {"a": "succeeded"}


async def test_delete_cancels_a_running_job_and_forgets_it(tmp_path: Path) -> None:
    async with node_agent(tmp_path) as node:
        await run_job(node, "a")
        response = await node.client.delete("/jobs/a")
        assert response.status_code == 200
        assert (response.json()["state"], response.json()["forgotten"]) == ("cancelled", True)
        assert node.backend.cancelled == ["a"]
        assert (await node.client.get("/jobs/a")).status_code == 404
        assert node.folders() == set()
        assert (await node.health())["free_slots"] == 1


async def test_delete_forgets_a_finished_job_and_its_result(tmp_path: Path) -> None:
    async with node_agent(tmp_path) as node:
        await run_job(node, "a")
        node.backend.succeed("a")
        await node.wait_state("a", "succeeded")
        assert (await node.client.delete("/jobs/a")).json()["state"] == "succeeded"
        assert (await node.client.get("/jobs/a/result")).status_code == 404
        assert node.folders() == set()
        assert node.backend.cancelled == []


# -- /health ---------------------------------------------------------------------------------
async def test_health_follows_the_slots(tmp_path: Path) -> None:
    async with node_agent(tmp_path) as node:
        idle = await node.health()
        assert idle["status"] == "ready"
        assert (idle["free_slots"], idle["max_concurrent"], idle["running"]) == (1, 1, [])
        assert (idle["jobs"], idle["peak_running"]) == ({}, 0)
        assert (idle["backend"], idle["backend_ok"], idle["version"]) == (
            "scripted",
            True,
            __version__,
        )

        await run_job(node, "a")
        busy = await node.health()
        assert (busy["status"], busy["free_slots"], busy["running"]) == ("busy", 0, ["a"])
        assert (busy["jobs"], busy["peak_running"]) == ({"a": "running"}, 1)

        node.backend.succeed("a")
        await node.wait_state("a", "succeeded")
        done = await node.health()
        assert (done["status"], done["free_slots"], done["running"]) == ("ready", 1, [])
        assert (done["jobs"], done["peak_running"], done["jobs_done"]) == (
            {"a": "succeeded"},
            1,
            1,
        )


async def test_health_is_unhealthy_when_the_backend_probe_fails(tmp_path: Path) -> None:
    backend = ScriptedBackend()
    backend.health = BackendHealth(ok=False, detail="model container is down")
    async with node_agent(tmp_path, backend=backend) as node:
        await until(lambda: not node.app.state.node.backend_health.ok, "the first probe")
        health = await node.health()
        assert (health["status"], health["backend_ok"]) == ("unhealthy", False)
        assert health["backend_detail"] == "model container is down"
    assert backend.closed  # the lifespan released the backend on the way out


# -- token -----------------------------------------------------------------------------------
ROUTES = [
    ("GET", "/health"),
    ("POST", "/jobs?job_id=a"),
    ("GET", "/jobs/a"),
    ("GET", "/jobs/a/result"),
    ("DELETE", "/jobs/a"),
]


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong", f"Basic {TOKEN}x", "Bearer", f"Bearer {TOKEN[:-1]}"],
    ids=["missing", "wrong", "other-scheme", "empty", "prefix"],
)
async def test_a_missing_or_wrong_token_is_401_on_every_route(
    tmp_path: Path, authorization: str | None
) -> None:
    async with node_agent(tmp_path) as node:
        await run_job(node, "a")  # a real job, so a 401 cannot be a 404 in disguise
        del node.client.headers["Authorization"]
        if authorization is not None:
            node.client.headers["Authorization"] = authorization
        for method, url in ROUTES:
            body = Body()
            response = await node.client.request(
                method, url, content=body, headers={"content-type": body.content_type}
            )
            assert response.status_code == 401, (method, url, response.text)
            assert "token" in response.json()["detail"]
            assert not body.read
        assert node.backend.cancelled == [] and node.folders() == {"a"}


async def test_the_right_token_opens_every_route(tmp_path: Path) -> None:
    async with node_agent(tmp_path) as node:
        assert (await node.client.get("/health")).status_code == 200
        assert (await post_job(node, "a")).status_code == 201
        assert (await node.client.get("/jobs/a")).status_code == 200
        assert (await node.client.get("/jobs/a/result")).status_code == 409
        assert (await node.client.delete("/jobs/a")).status_code == 200


async def test_without_a_configured_token_no_header_is_needed(tmp_path: Path) -> None:
    async with node_agent(tmp_path, token="") as node:
        del node.client.headers["Authorization"]
        assert (await node.client.get("/health")).status_code == 200
        assert (await post_job(node, "a")).status_code == 201
