"""Nothing lost: real processes killed with SIGKILL, nodes that hang, cancel that frees a slot."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    ROOT,
    CallbackReceiver,
    Fleet,
    check_result,
    submit,
    task_status,
    wait_for,
    wait_terminal,
)

pytestmark = pytest.mark.e2e


def paced_env(readrate: float) -> dict[str, str]:
    return {"HEYGEM_NODE_FFMPEG_READRATE": str(readrate)}


def node_jobs(fleet: Fleet, name: str) -> dict[str, str]:
    jobs: dict[str, str] = httpx.get(f"{fleet.nodes[name].url}/health").json()["jobs"]
    return jobs


def test_dispatcher_sigkill_mid_flight_loses_nothing(
    make_fleet: Callable[[], Fleet],
    callbacks: CallbackReceiver,
    tmp_path: Path,
    audio_seconds: float,
) -> None:
    fleet = make_fleet()
    fleet.add_node("node-a", 1, env=paced_env(3.0))
    fleet.add_node("node-b", 2, env=paced_env(3.0))
    fleet.write_machines()
    fleet.start_dispatcher()
    ids = [
        submit(fleet.url, description=f"t{i}", callback_url=callbacks.url).json()["task_id"]
        for i in range(10)
    ]

    def mixed() -> bool:
        statuses = [task_status(fleet.url, i)["status"] for i in ids]
        return "processing" in statuses and "pending" in statuses

    wait_for(mixed, 20, "some tasks running while others wait")
    assert fleet.dispatcher is not None
    fleet.dispatcher.kill()
    fleet.start_dispatcher()

    tasks = wait_terminal(fleet.url, ids, timeout_s=120)
    assert [t["status"] for t in tasks] == ["completed"] * 10, tasks
    for task_id in ids:
        check_result(fleet.url, task_id, tmp_path / f"{task_id}.mp4", audio_seconds)
    wait_for(lambda: all(callbacks.for_task(i) for i in ids), 20, "a callback per task")
    for task_id in ids:
        assert {c["status"] for c in callbacks.for_task(task_id)} == {"completed"}
    # Each task ran to completion exactly once over the whole fleet ...
    done = sum(httpx.get(f"{n.url}/health").json()["jobs_done"] for n in fleet.nodes.values())
    assert done == 10
    # ... and no node keeps a job nobody owns.
    wait_for(
        lambda: not node_jobs(fleet, "node-a") and not node_jobs(fleet, "node-b"),
        10,
        "nodes to have no jobs left",
    )


def test_node_sigkill_mid_job_moves_its_task(
    make_fleet: Callable[[], Fleet], tmp_path: Path, audio_seconds: float
) -> None:
    fleet = make_fleet()
    fleet.add_node("doomed", 1, env=paced_env(1.0))
    fleet.add_node("steady", 1, env=paced_env(4.0))
    fleet.write_machines()
    fleet.start_dispatcher()
    ids = [submit(fleet.url, description=f"t{i}").json()["task_id"] for i in range(3)]

    def running_on_doomed() -> str | None:
        for task_id in ids:
            task = task_status(fleet.url, task_id)
            if task["node"] == "doomed" and task["progress"] > 0:
                return task_id
        return None

    victim = wait_for(running_on_doomed, 20, "a task making progress on the doomed node")
    fleet.nodes["doomed"].kill()

    tasks = {t["task_id"]: t for t in wait_terminal(fleet.url, ids, timeout_s=90)}
    assert all(t["status"] == "completed" for t in tasks.values()), tasks
    assert tasks[victim]["node"] == "steady"
    assert tasks[victim]["attempts"] == 2
    first = tasks[victim]["attempt_log"][0]
    assert first["node"] == "doomed" and first["outcome"] == "node_failed"
    for task_id in ids:
        check_result(fleet.url, task_id, tmp_path / f"{task_id}.mp4", audio_seconds)
    machines = {m["name"]: m for m in httpx.get(f"{fleet.url}/machines").json()["machines"]}
    assert machines["doomed"]["health"] == "unhealthy"
    assert machines["doomed"]["last_error"]


def test_hung_backend_is_abandoned_after_the_stall_timeout(
    make_fleet: Callable[[], Fleet], tmp_path: Path, audio_seconds: float
) -> None:
    fleet = make_fleet()
    hang = f"{sys.executable} {ROOT / 'tests/scripts/hang_model.py'} {{output}}"
    fleet.add_node(
        "hangs",
        1,
        backend="command",
        extra=["--command", hang, "--command-progress-regex", r"progress: (\d+)%"],
    )
    fleet.add_node("works", 1)
    fleet.write_machines()
    fleet.start_dispatcher()
    # Two tasks: one lands on each node; the one on "hangs" sticks at 20 %.
    ids = [
        submit(fleet.url, description=f"t{i}", stall_timeout=2).json()["task_id"] for i in range(2)
    ]

    tasks = {t["task_id"]: t for t in wait_terminal(fleet.url, ids, timeout_s=60)}
    assert all(t["status"] == "completed" for t in tasks.values()), tasks
    [stuck] = [t for t in tasks.values() if t["attempts"] == 2]
    assert stuck["attempt_log"][0]["node"] == "hangs"
    assert "stalled: no progress for 2s at 20%" in stuck["attempt_log"][0]["error"]
    check_result(fleet.url, stuck["task_id"], tmp_path / "r.mp4", audio_seconds)
    # The hung job was cancelled on its node: the slot is free again.
    wait_for(lambda: not node_jobs(fleet, "hangs"), 10, "the hung job to be gone")


def test_cancel_frees_the_slot_within_a_second(
    make_fleet: Callable[[], Fleet], callbacks: CallbackReceiver
) -> None:
    fleet = make_fleet()
    fleet.add_node("only", 1, env=paced_env(0.5))  # a 12 s job
    fleet.write_machines()
    fleet.start_dispatcher()
    first = submit(fleet.url, callback_url=callbacks.url).json()["task_id"]
    second = submit(fleet.url).json()["task_id"]
    wait_for(lambda: task_status(fleet.url, first)["stage"] == "running", 20, "first running")
    assert task_status(fleet.url, second)["status"] == "pending"

    started = time.monotonic()
    response = httpx.delete(f"{fleet.url}/tasks/{first}")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    wait_for(
        lambda: task_status(fleet.url, second)["status"] == "processing",
        1.0,
        "the queued task to take the freed slot",
    )
    assert time.monotonic() - started < 1.0
    assert f"{first}.1" not in node_jobs(fleet, "only")
    wait_for(lambda: callbacks.for_task(first), 10, "the cancel callback")
    assert callbacks.for_task(first)[0]["status"] == "cancelled"
    # A cancelled task can be cancelled no more, but it can be retried.
    assert httpx.delete(f"{fleet.url}/tasks/{first}").status_code == 409
    retried = httpx.post(f"{fleet.url}/tasks/{first}/retry")
    assert retried.status_code == 200 and retried.json()["status"] == "pending"


def test_sigterm_leaves_node_jobs_running_for_the_next_start(
    make_fleet: Callable[[], Fleet], tmp_path: Path, audio_seconds: float
) -> None:
    fleet = make_fleet()
    fleet.add_node("only", 1, env=paced_env(1.5))  # a 4 s job
    fleet.write_machines()
    fleet.start_dispatcher()
    task_id = submit(fleet.url).json()["task_id"]
    wait_for(lambda: task_status(fleet.url, task_id)["stage"] == "running", 20, "running")
    assert fleet.dispatcher is not None
    fleet.dispatcher.stop()  # SIGTERM: a graceful stop
    assert node_jobs(fleet, "only") == {f"{task_id}.1": "running"}
    fleet.start_dispatcher()
    [task] = wait_terminal(fleet.url, [task_id], 30)
    assert task["status"] == "completed" and task["attempts"] == 1
    check_result(fleet.url, task_id, tmp_path / "r.mp4", audio_seconds)


def test_retention_deletes_files_and_keeps_the_row(make_fleet: Callable[[], Fleet]) -> None:
    fleet = make_fleet()
    fleet.add_node("only", 1)
    fleet.write_machines()
    fleet.start_dispatcher(env={"HEYGEM_RETENTION_S": "1", "HEYGEM_CLEANUP_INTERVAL_S": "0.3"})
    task_id = submit(fleet.url).json()["task_id"]
    wait_terminal(fleet.url, [task_id], 30)
    data = fleet.workdir / "dispatcher"
    wait_for(lambda: task_status(fleet.url, task_id)["files_expired"], 10, "files to expire")
    task = task_status(fleet.url, task_id)
    assert task["status"] == "completed" and task["result_url"] is None
    assert not (data / "uploads" / task_id).exists()
    assert not (data / "results" / f"{task_id}.mp4").exists()
    gone = httpx.get(f"{fleet.url}/tasks/{task_id}/result")
    assert gone.status_code == 410 and "deleted by retention" in gone.json()["detail"]
