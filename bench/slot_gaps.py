"""How long a node slot sits idle between two tasks while work waits in the queue.

    .venv/bin/python bench/slot_gaps.py [--tasks 24] [--pace 4]

Starts real processes on loopback ports: two node agents with the ffmpeg backend (1 and 2
slots, paced so a job takes audio length / pace seconds, like a GPU model) and a dispatcher
with its default settings. Submits every task at once, waits for all to finish, then reads
each task's timeline from the API. For every node it reports the slot time per task (from
hand-over to the result stored on the dispatcher, against the time the job alone renders)
and the gaps between the end of one task and the hand-over of the next to that slot.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from heygem_common.launcher import (
    Service,
    dispatcher_service,
    machine_entry,
    node_service,
    write_machines,
)
from heygem_common.media import probe

ROOT = Path(__file__).resolve().parent.parent
AUDIO, VIDEO = ROOT / "samples/input/audio.mp3", ROOT / "samples/input/video.mp4"


def start(workdir: Path, pace: float) -> tuple[list[Service], Service]:
    env = {"HEYGEM_NODE_FFMPEG_READRATE": str(pace)}
    nodes = [
        node_service(workdir, "one-slot", max_concurrent=1, env=env).start(),
        node_service(workdir, "two-slots", max_concurrent=2, env=env).start(),
    ]
    write_machines(
        workdir / "machines.json", [machine_entry(nodes[0], 1), machine_entry(nodes[1], 2)]
    )
    dispatcher = dispatcher_service(workdir, workdir / "machines.json").start()
    return nodes, dispatcher


def submit_all(client: httpx.Client, count: int) -> list[str]:
    ids = []
    for i in range(count):
        with AUDIO.open("rb") as audio, VIDEO.open("rb") as video:
            response = client.post(
                "/tasks",
                files={"audio_file": audio, "video_file": video},
                data={"description": f"gap {i}"},
            )
        response.raise_for_status()
        ids.append(response.json()["task_id"])
    return ids


def wait_all(client: httpx.Client, ids: list[str]) -> list[dict[str, Any]]:
    while True:
        tasks: list[dict[str, Any]] = client.post("/tasks/batch", json={"task_ids": ids}).json()[
            "tasks"
        ]
        if all(t["status"] in ("completed", "failed", "cancelled") for t in tasks):
            return tasks
        time.sleep(0.2)


def ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def slot_gaps(tasks: list[dict[str, Any]], slots: int) -> list[float]:
    """Gaps on one node: each hand-over waits for the earliest slot to come free."""
    ordered = sorted(tasks, key=lambda t: ts(t["started_at"]))
    free_at = [ts(t["completed_at"]) for t in ordered[:slots]]
    gaps = []
    for task in ordered[slots:]:
        earliest = min(free_at)
        gaps.append(max(0.0, ts(task["started_at"]) - earliest))
        free_at[free_at.index(earliest)] = ts(task["completed_at"])
    return gaps


def report(tasks: list[dict[str, Any]], elapsed: float, job_s: float) -> None:
    failed = [t for t in tasks if t["status"] != "completed"]
    print(
        f"{len(tasks)} tasks, {len(failed)} not completed, wall time {elapsed:.1f} s;"
        f" one job alone renders for about {job_s:.2f} s"
    )
    all_gaps = []
    for name, slots in (("one-slot", 1), ("two-slots", 2)):
        mine = [t for t in tasks if t["node"] == name]
        gaps = slot_gaps(mine, slots)
        all_gaps += gaps
        busy = sum(ts(t["completed_at"]) - ts(t["started_at"]) for t in mine)
        if gaps:
            print(f"  {name:<9} slot time per task {busy / len(mine):.2f} s")
            print(
                f"  {name:<9} {len(mine):>3} tasks, busy {busy:6.1f} slot-s, gap between tasks:"
                f" median {statistics.median(gaps) * 1000:5.0f} ms,"
                f" max {max(gaps) * 1000:5.0f} ms"
            )
    if all_gaps:
        print(
            f"  all slots: {len(all_gaps)} hand-overs, median gap "
            f"{statistics.median(all_gaps) * 1000:.0f} ms, max {max(all_gaps) * 1000:.0f} ms"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=24)
    parser.add_argument(
        "--pace", type=float, default=4.0, help="media seconds a node renders per second"
    )
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="heygem-gaps-"))
    nodes, dispatcher = start(workdir, args.pace)
    try:
        with httpx.Client(base_url=dispatcher.url, timeout=60) as client:
            began = time.monotonic()
            ids = submit_all(client, args.tasks)
            tasks = wait_all(client, ids)
            report(tasks, time.monotonic() - began, probe(AUDIO).duration_s / args.pace)
    finally:
        for service in (dispatcher, *nodes):
            service.stop()


if __name__ == "__main__":
    main()
