"""The skeleton end to end: real dispatcher and node processes on loopback ports."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    AUDIO,
    ROOT,
    VIDEO,
    CallbackReceiver,
    Fleet,
    check_result,
    submit,
    wait_for,
    wait_terminal,
)

pytestmark = pytest.mark.e2e


def test_eight_tasks_on_two_nodes_all_complete_within_slots(
    make_fleet: Callable[[], Fleet],
    callbacks: CallbackReceiver,
    tmp_path: Path,
    audio_seconds: float,
) -> None:
    fleet = make_fleet()
    fleet.add_node("node-a", 1)
    fleet.add_node("node-b", 2)
    fleet.write_machines()
    fleet.start_dispatcher()

    with ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(
                lambda i: submit(fleet.url, description=f"task {i}", callback_url=callbacks.url),
                range(8),
            )
        )
    assert [r.status_code for r in responses] == [200] * 8
    ids = [r.json()["task_id"] for r in responses]
    assert all(r.json()["status"] in ("pending", "processing") for r in responses)

    tasks = wait_terminal(fleet.url, ids, timeout_s=90)
    assert [t["status"] for t in tasks] == ["completed"] * 8, tasks
    for task_id in ids:
        check_result(fleet.url, task_id, tmp_path / f"{task_id}.mp4", audio_seconds)

    used = {t["node"] for t in tasks}
    assert used == {"node-a", "node-b"}, "both nodes should have taken work"
    for name, node in fleet.nodes.items():
        peak = httpx.get(f"{node.url}/health").json()["peak_running"]
        assert 1 <= peak <= fleet.node_limits[name], (name, peak)

    wait_for(lambda: len(callbacks.received) >= 8, 15, "8 callbacks")
    for task_id in ids:
        [callback] = callbacks.for_task(task_id)
        assert callback["status"] == "completed"
        assert {"task_id", "status", "completed_at", "error_message"} <= callback.keys()
        assert callback["error_message"] is None
        assert callback["result_url"].endswith(f"/tasks/{task_id}/result")
    # The task status says the callback got through.
    [delivery] = httpx.get(f"{fleet.url}/tasks/{ids[0]}").json()["callbacks"]
    assert delivery["url"] == callbacks.url and delivery["attempts"] == 1
    assert delivery["delivered_at"] is not None and delivery["last_error"] is None


@pytest.fixture(scope="module")
def small_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("small-fleet")
    fleet = Fleet(workdir, workdir / "machines.json")
    fleet.add_node("solo", 2)
    fleet.write_machines()
    fleet.start_dispatcher()
    yield fleet
    fleet.stop()


def test_sync_returns_the_video_bytes(
    small_fleet: Fleet, tmp_path: Path, audio_seconds: float
) -> None:
    with AUDIO.open("rb") as audio, VIDEO.open("rb") as video:
        response = httpx.post(
            f"{small_fleet.url}/tasks/sync",
            files={"audio": audio, "video": video},
            data={"description": "sync"},
            timeout=60,
        )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "video/mp4"
    task_id = response.headers["x-task-id"]
    out = tmp_path / "sync.mp4"
    out.write_bytes(response.content)
    check_result(small_fleet.url, task_id, tmp_path / "again.mp4", audio_seconds)
    assert out.read_bytes() == (tmp_path / "again.mp4").read_bytes()


@pytest.mark.parametrize("script", ["sync_example.py", "async_example.py"])
def test_the_seed_sample_clients_work_unchanged(
    small_fleet: Fleet, callbacks: CallbackReceiver, script: str, tmp_path: Path
) -> None:
    env = {**os.environ, "HEYGEM_API_URL": small_fleet.url, "HEYGEM_CALLBACK_URL": callbacks.url}
    # The samples use relative paths (./samples/input, ./output), as the seed's do.
    workdir = tmp_path / "client"
    (workdir / "samples").mkdir(parents=True)
    (workdir / "samples/input").symlink_to(ROOT / "samples/input")
    run = subprocess.run(
        [sys.executable, str(ROOT / "samples" / script)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert run.returncode == 0, run.stderr
    if script == "sync_example.py":
        assert "视频生成成功" in run.stdout, run.stdout
        assert (workdir / "output/result.mp4").stat().st_size > 10_000
    else:
        assert "任务创建成功" in run.stdout and "当前任务状态" in run.stdout, run.stdout
        task_id = run.stdout.split("任务ID: ")[1].split()[0]
        wait_for(lambda: callbacks.for_task(task_id), 30, "the sample task's callback")


def _uploads_left(fleet: Fleet) -> list[str]:
    uploads = fleet.workdir / "dispatcher" / "uploads"
    return sorted(p.name for p in uploads.iterdir()) if uploads.exists() else []


def _task_total(fleet: Fleet) -> int:
    total: int = httpx.get(f"{fleet.url}/tasks").json()["total"]
    return total


TEXT = b"this is a text file, not a video\n" * 20


@pytest.mark.parametrize(
    ("files", "status", "words"),
    [
        ({"video_file": ("v.mp4", VIDEO.read_bytes())}, 400, "missing the audio file"),
        ({"audio_file": ("a.mp3", AUDIO.read_bytes())}, 400, "missing the video file"),
        (
            {"audio_file": ("a.mp3", b""), "video_file": ("v.mp4", VIDEO.read_bytes())},
            400,
            "is empty",
        ),
        (
            {"audio_file": ("a.mp3", AUDIO.read_bytes()), "video_file": ("v.mp4", TEXT)},
            415,
            "not a readable media file",
        ),
        (
            {"audio_file": ("a.mp3", TEXT), "video_file": ("v.mp4", VIDEO.read_bytes())},
            415,
            "not a readable media file",
        ),
        (
            {
                "audio_file": ("a.mp3", VIDEO.read_bytes()),
                "video_file": ("v.mp4", AUDIO.read_bytes()),
            },
            415,
            "has no",
        ),
    ],
    ids=["no-audio", "no-video", "empty-audio", "text-as-video", "text-as-audio", "swapped"],
)
def test_bad_input_is_refused_and_leaves_nothing(
    small_fleet: Fleet, files: dict[str, tuple[str, bytes]], status: int, words: str
) -> None:
    before = _task_total(small_fleet)
    uploads_before = _uploads_left(small_fleet)
    response = httpx.post(f"{small_fleet.url}/tasks", files=files, timeout=30)
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]
    assert _task_total(small_fleet) == before
    assert _uploads_left(small_fleet) == uploads_before


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"callback_url": "not a url"}, "callback_url must be an absolute http(s) URL"),
        ({"priority": "high"}, "priority must be a number"),
        ({"task_id": "../etc/passwd"}, "task_id must be"),
        ({"options": "[1, 2]"}, "options must be a JSON object"),
    ],
)
def test_bad_fields_are_refused(small_fleet: Fleet, data: dict[str, str], words: str) -> None:
    before = _task_total(small_fleet)
    response = submit(small_fleet.url, **data)
    assert response.status_code == 400, response.text
    assert words in response.json()["detail"]
    assert _task_total(small_fleet) == before


def test_not_multipart_is_refused(small_fleet: Fleet) -> None:
    response = httpx.post(f"{small_fleet.url}/tasks", json={"audio": "x"})
    assert response.status_code == 415
    assert "multipart/form-data" in response.json()["detail"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/tasks/nope"),
        ("GET", "/tasks/nope/result"),
        ("DELETE", "/tasks/nope"),
        ("POST", "/tasks/nope/retry"),
    ],
)
def test_unknown_task_is_404_with_a_message(small_fleet: Fleet, method: str, path: str) -> None:
    response = httpx.request(method, f"{small_fleet.url}{path}")
    assert response.status_code == 404
    assert response.json()["detail"] == "task not found: nope"


def test_openapi_docs_are_served(small_fleet: Fleet) -> None:
    assert httpx.get(f"{small_fleet.url}/docs").status_code == 200
    spec = httpx.get(f"{small_fleet.url}/openapi.json").json()
    form = spec["paths"]["/tasks"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert {"audio_file", "video_file", "callback_url"} <= form["schema"]["properties"].keys()
