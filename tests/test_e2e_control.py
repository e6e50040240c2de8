"""User control over tasks: priority, idempotent submit, expiry, listing, batch status."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.conftest import (
    CallbackReceiver,
    Fleet,
    submit,
    task_status,
    wait_for,
    wait_terminal,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def one_slot(make_fleet: Callable[[], Fleet]) -> Fleet:
    """A fleet of one slot whose jobs take ~2 s, so tasks queue up behind each other."""
    fleet = make_fleet()
    fleet.add_node("only", 1, env={"HEYGEM_NODE_FFMPEG_READRATE": "3"})
    fleet.write_machines()
    fleet.start_dispatcher()
    return fleet


def test_priority_then_fifo(one_slot: Fleet) -> None:
    url = one_slot.url
    blocker = submit(url, description="blocker").json()["task_id"]
    wait_for(lambda: task_status(url, blocker)["status"] == "processing", 10, "blocker running")
    low1 = submit(url, description="low1").json()["task_id"]
    low2 = submit(url, description="low2").json()["task_id"]
    high = submit(url, description="high", priority=5).json()["task_id"]
    positions = {i: task_status(url, i)["queue_position"] for i in (high, low1, low2)}
    assert positions == {high: 1, low1: 2, low2: 3}
    etas = [task_status(url, i)["eta"] for i in (high, low1, low2)]
    assert all(etas) and etas == sorted(etas)

    tasks = wait_terminal(url, [blocker, low1, low2, high], timeout_s=60)
    started = {t["task_id"]: t["started_at"] for t in tasks}
    assert started[blocker] < started[high] < started[low1] < started[low2]


def test_same_task_id_or_idempotency_key_returns_the_first_task(one_slot: Fleet) -> None:
    url = one_slot.url
    first = submit(url, task_id="client-42", description="first")
    again = submit(url, task_id="client-42", description="second")
    assert first.status_code == again.status_code == 200
    assert again.json()["task_id"] == "client-42"
    assert again.json()["description"] == "first"

    with open(__file__, "rb") as junk:  # a new key is a real submit, validated as any other
        keyed = httpx.post(
            f"{url}/tasks", headers={"Idempotency-Key": "k1"}, files={"audio_file": junk}
        )
    assert keyed.status_code == 400  # unknown key: a real (bad) submit
    a = submit_with_key(url, "k2")
    b = submit_with_key(url, "k2")
    assert a.json()["task_id"] == b.json()["task_id"]
    listed = httpx.get(f"{url}/tasks", params={"limit": 100}).json()
    assert listed["total"] == 2


def submit_with_key(url: str, key: str) -> httpx.Response:
    from tests.conftest import AUDIO, VIDEO

    with AUDIO.open("rb") as audio, VIDEO.open("rb") as video:
        return httpx.post(
            f"{url}/tasks",
            headers={"Idempotency-Key": key},
            files={"audio_file": audio, "video_file": video},
            timeout=30,
        )


def test_a_task_not_started_in_time_expires(one_slot: Fleet) -> None:
    url = one_slot.url
    blocker = submit(url).json()["task_id"]
    wait_for(lambda: task_status(url, blocker)["status"] == "processing", 10, "blocker running")
    doomed = submit(url, expires_in=1).json()["task_id"]
    [task] = wait_terminal(url, [doomed], timeout_s=10)
    assert task["status"] == "failed"
    assert task["error_message"].startswith("expired: not started within its expiry")
    # A retry is an explicit "run it now": the old deadline no longer applies.
    retried = httpx.post(f"{url}/tasks/{doomed}/retry").json()
    assert retried["status"] == "pending" and retried["expires_at"] is None
    assert httpx.post(f"{url}/tasks/{blocker}/retry").status_code == 409  # still live


def test_listing_filters_and_batch_status(one_slot: Fleet) -> None:
    url = one_slot.url
    ids = [submit(url, description=f"t{i}").json()["task_id"] for i in range(3)]
    wait_terminal(url, ids, timeout_s=60)
    listed = httpx.get(f"{url}/tasks", params={"status": "completed", "limit": 2}).json()
    assert listed["total"] == 3 and len(listed["tasks"]) == 2
    assert [t["task_id"] for t in listed["tasks"]] == ids[::-1][:2]  # newest first
    page2 = httpx.get(
        f"{url}/tasks", params={"status": "completed", "limit": 2, "offset": 2}
    ).json()
    assert [t["task_id"] for t in page2["tasks"]] == [ids[0]]
    assert httpx.get(f"{url}/tasks", params={"status": "failed"}).json()["total"] == 0
    assert httpx.get(f"{url}/tasks", params={"status": "bogus"}).status_code == 422

    batch = httpx.post(f"{url}/tasks/batch", json={"task_ids": [ids[0], "nope", ids[2]]})
    body = batch.json()
    assert [t["task_id"] for t in body["tasks"]] == [ids[0], ids[2]]
    assert body["unknown"] == ["nope"]
    by_query = httpx.get(f"{url}/tasks", params={"ids": f"{ids[1]},missing"}).json()
    assert [t["task_id"] for t in by_query["tasks"]] == [ids[1]]
    assert by_query["unknown"] == ["missing"]


def test_a_nearly_full_disk_refuses_new_work(make_fleet: Callable[[], Fleet]) -> None:
    fleet = make_fleet()
    fleet.add_node("only", 1)
    fleet.write_machines()
    fleet.start_dispatcher(env={"HEYGEM_MIN_FREE_DISK_BYTES": str(2**62)})
    response = submit(fleet.url)
    assert response.status_code == 507
    assert "disk is nearly full" in response.json()["detail"]
    assert httpx.get(f"{fleet.url}/tasks").json()["total"] == 0


def test_progress_reaches_status_and_optional_progress_callbacks(
    one_slot: Fleet, callbacks: CallbackReceiver
) -> None:
    url = one_slot.url
    task_id = submit(url, callback_url=callbacks.url, progress_callbacks="true").json()["task_id"]
    seen = wait_for(lambda: task_status(url, task_id)["progress"] > 0, 20, "progress > 0")
    assert seen
    wait_terminal(url, [task_id], 30)
    wait_for(
        lambda: any(c["status"] == "completed" for c in callbacks.for_task(task_id)),
        10,
        "the terminal callback",
    )
    received = callbacks.for_task(task_id)
    progress = [c["progress"] for c in received if c["status"] == "processing"]
    assert len(progress) >= 2 and progress == sorted(progress) and progress[-1] <= 100
    assert [c["status"] for c in received].count("completed") == 1
    assert received[-1]["status"] == "completed"
    assert submit(url, progress_callbacks="maybe").status_code == 400
