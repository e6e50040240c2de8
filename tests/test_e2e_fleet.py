"""The fleet changes under a running dispatcher: machines.json edits, sick nodes."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.conftest import Fleet, submit, task_status, wait_for, wait_terminal

pytestmark = pytest.mark.e2e
SLOW = {"HEYGEM_NODE_FFMPEG_READRATE": "2"}  # a 6 s audio takes ~3 s


def machines(fleet: Fleet) -> dict[str, dict[str, Any]]:
    body = httpx.get(f"{fleet.url}/machines").json()
    return {m["name"]: m for m in body["machines"]}


def test_machines_json_edits_apply_while_tasks_run(make_fleet: Callable[[], Fleet]) -> None:
    fleet = make_fleet()
    fleet.add_node("old", 1, env=SLOW)
    newcomer = fleet.add_node("new", 2, env=SLOW)
    fleet.nodes.pop("new")  # not in machines.json yet
    fleet.write_machines()
    fleet.start_dispatcher()

    running = submit(fleet.url, description="on old").json()["task_id"]
    wait_for(lambda: task_status(fleet.url, running)["stage"] == "running", 20, "old busy")

    # Add "new" and disable "old" in one edit.
    fleet.nodes["new"] = newcomer
    edited = time.monotonic()
    fleet.write_machines(enabled={"old": False})
    wait_for(
        lambda: machines(fleet).get("new", {}).get("state") == "healthy",
        5,
        "the new node to be known and healthy",
    )
    later = [submit(fleet.url, description=f"after {i}").json()["task_id"] for i in range(3)]
    wait_for(
        lambda: task_status(fleet.url, later[0])["node"] == "new", 5, "the new node to receive work"
    )
    assert time.monotonic() - edited < 5.0
    assert machines(fleet)["old"]["state"] == "disabled"

    tasks = {t["task_id"]: t for t in wait_terminal(fleet.url, [running, *later], 90)}
    assert all(t["status"] == "completed" for t in tasks.values()), tasks
    assert tasks[running]["node"] == "old"  # its running task finished where it was
    assert {tasks[i]["node"] for i in later} == {"new"}  # nothing new went to "old"

    # A broken edit is refused whole: the fleet stays, the error is shown.
    fleet.machines.write_text('{"machines": [{"name": "new", "host": ')
    wait_for(
        lambda: httpx.get(f"{fleet.url}/machines").json()["config_error"], 5, "the error to show"
    )
    body = httpx.get(f"{fleet.url}/machines").json()
    assert "not valid JSON" in body["config_error"]
    assert set(machines(fleet)) == {"old", "new"}
    reload = httpx.post(f"{fleet.url}/machines/reload").json()
    assert reload["applied"] is False and "keeping the last good fleet" in reload["config_error"]
    done = submit(fleet.url).json()["task_id"]
    assert wait_terminal(fleet.url, [done], 30)[0]["status"] == "completed"


def test_a_node_failing_its_probe_gets_no_work_until_it_recovers(
    make_fleet: Callable[[], Fleet],
) -> None:
    fleet = make_fleet()
    sick = fleet.add_node("sick", 1)
    fleet.add_node("fine", 1)
    fleet.write_machines()
    fleet.start_dispatcher()
    wait_for(
        lambda: all(m["health"] == "healthy" for m in machines(fleet).values()),
        10,
        "both nodes healthy",
    )

    assert sick.process is not None
    os.kill(sick.process.pid, signal.SIGSTOP)  # alive but answering nothing
    try:
        wait_for(
            lambda: machines(fleet)["sick"]["health"] == "unhealthy",
            10,
            "the frozen node to be marked unhealthy",
        )
        ids = [submit(fleet.url, description=f"t{i}").json()["task_id"] for i in range(3)]
        tasks = wait_terminal(fleet.url, ids, 60)
        assert [t["node"] for t in tasks] == ["fine"] * 3
        assert all(t["attempts"] == 1 for t in tasks)
        assert machines(fleet)["sick"]["last_error"]
    finally:
        os.kill(sick.process.pid, signal.SIGCONT)

    wait_for(lambda: machines(fleet)["sick"]["health"] == "healthy", 10, "recovery")
    ids = [submit(fleet.url, description=f"back {i}").json()["task_id"] for i in range(4)]
    tasks = wait_terminal(fleet.url, ids, 60)
    assert all(t["status"] == "completed" for t in tasks)
    assert "sick" in {t["node"] for t in tasks}
