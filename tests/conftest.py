"""Shared fixtures: sample media, a callback receiver, and real fleets on loopback ports."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from heygem_common.launcher import (
    Service,
    dispatcher_service,
    machine_entry,
    node_service,
    write_machines,
)
from heygem_common.media import probe

ROOT = Path(__file__).resolve().parent.parent
AUDIO = ROOT / "samples/input/audio.mp3"
VIDEO = ROOT / "samples/input/video.mp4"
TERMINAL = ("completed", "failed", "cancelled")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def audio_seconds() -> float:
    return probe(AUDIO).duration_s


# -- a callback receiver: a real HTTP server on loopback ------------------------------------
@dataclass
class CallbackReceiver:
    url: str
    received: list[dict[str, Any]] = field(default_factory=list)
    # Answer this status to the first N posts (a misbehaving receiver), then 200.
    fail_first: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def for_task(self, task_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [c for c in self.received if c.get("task_id") == task_id]


@pytest.fixture
def callbacks() -> Iterator[CallbackReceiver]:
    receiver: CallbackReceiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            with receiver.lock:
                if receiver.fail_first > 0:
                    receiver.fail_first -= 1
                    status = 503
                else:
                    receiver.received.append(json.loads(body))
                    status = 200
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver = CallbackReceiver(f"http://127.0.0.1:{server.server_address[1]}/hook")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield receiver
    server.shutdown()
    server.server_close()


# -- fleets of real processes ---------------------------------------------------------------
@dataclass
class Fleet:
    workdir: Path
    machines: Path
    nodes: dict[str, Service] = field(default_factory=dict)
    dispatcher: Service | None = None
    node_limits: dict[str, int] = field(default_factory=dict)

    @property
    def url(self) -> str:
        assert self.dispatcher is not None
        return self.dispatcher.url

    def add_node(
        self,
        name: str,
        max_concurrent: int,
        backend: str = "ffmpeg",
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
        start: bool = True,
    ) -> Service:
        node = node_service(
            self.workdir, name, max_concurrent=max_concurrent, backend=backend, extra=extra, env=env
        )
        self.nodes[name] = node
        self.node_limits[name] = max_concurrent
        if start:
            node.start()
        return node

    def write_machines(self, enabled: dict[str, bool] | None = None) -> None:
        enabled = enabled or {}
        write_machines(
            self.machines,
            [
                machine_entry(n, self.node_limits[name], enabled.get(name, True))
                for name, n in self.nodes.items()
            ],
        )

    def start_dispatcher(
        self, extra: list[str] | None = None, env: dict[str, str] | None = None
    ) -> Service:
        if self.dispatcher is None:
            self.dispatcher = dispatcher_service(
                self.workdir, self.machines, extra=extra, env={**FAST_DISPATCHER_ENV, **(env or {})}
            )
        else:  # a restart: same port, same data dir
            self.dispatcher.process = None
        return self.dispatcher.start()

    def stop(self) -> None:
        for service in [self.dispatcher, *self.nodes.values()]:
            if service is not None:
                service.stop()

    def logs(self) -> str:
        parts = []
        for service in [self.dispatcher, *self.nodes.values()]:
            if service is not None:
                parts.append(f"--- {service.name}\n{service.log_tail(40)}")
        return "\n".join(parts)


# Short intervals so the tests see health changes and reloads in seconds, not minutes.
FAST_DISPATCHER_ENV = {
    "HEYGEM_HEALTH_INTERVAL_S": "0.5",
    "HEYGEM_HEALTH_TIMEOUT_S": "1",
    "HEYGEM_POLL_INTERVAL_S": "0.2",
    "HEYGEM_MACHINES_RELOAD_INTERVAL_S": "0.5",
    "HEYGEM_NODE_HTTP_BACKOFF_S": "0.1",
    "HEYGEM_MIN_FREE_DISK_BYTES": "0",
}


@pytest.fixture
def make_fleet(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[[], Fleet]]:
    fleets: list[Fleet] = []

    def make() -> Fleet:
        fleet = Fleet(tmp_path, tmp_path / "machines.json")
        fleets.append(fleet)
        return fleet

    yield make
    failed = getattr(request.node, "rep_call", None)
    for fleet in fleets:
        if failed is not None and failed.failed:
            print(fleet.logs())
        fleet.stop()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


# -- client helpers ---------------------------------------------------------------------------
def submit(url: str, **data: Any) -> httpx.Response:
    with AUDIO.open("rb") as audio, VIDEO.open("rb") as video:
        return httpx.post(
            f"{url}/tasks",
            files={"audio_file": audio, "video_file": video},
            data={k: str(v) for k, v in data.items()},
            timeout=60,
        )


def wait_for(
    predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1
) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def task_status(url: str, task_id: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/tasks/{task_id}", timeout=10)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def wait_terminal(url: str, task_ids: list[str], timeout_s: float = 60) -> list[dict[str, Any]]:
    def all_done() -> list[dict[str, Any]] | None:
        tasks = httpx.post(f"{url}/tasks/batch", json={"task_ids": task_ids}, timeout=10).json()[
            "tasks"
        ]
        return tasks if all(t["status"] in TERMINAL for t in tasks) else None

    tasks: list[dict[str, Any]] = wait_for(all_done, timeout_s, "tasks to finish", 0.2)
    return tasks


def check_result(url: str, task_id: str, dest: Path, audio_seconds: float) -> None:
    """The result is a playable mp4 of the audio's length with one video + one audio stream."""
    response = httpx.get(f"{url}/tasks/{task_id}/result", timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "video/mp4"
    dest.write_bytes(response.content)
    info = probe(dest)
    assert info.video_streams == 1 and info.audio_streams == 1, info
    assert abs(info.duration_s - audio_seconds) <= 0.2, (info.duration_s, audio_seconds)
