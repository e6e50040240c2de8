"""``heygem-demo``: a local fleet turning the sample pair into finished videos.

Starts two node agents with the built-in ffmpeg backend (the ports of config/machines.json)
and a dispatcher on 8101, submits the sample audio + video a few times, shows each task's
progress until all are done, checks every result, and stops the fleet — or, with --keep,
leaves it running so you can open http://127.0.0.1:8101/ and /docs.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from heygem_common.launcher import Service, dispatcher_service, node_service
from heygem_common.media import probe

ROOT = Path(__file__).resolve().parent.parent


def start_fleet(machines: Path, workdir: Path, port: int, pace: float) -> list[Service]:
    config = json.loads(machines.read_text())["machines"]
    # Paced like a GPU model (a job takes audio length / pace), so progress is visible.
    env = {"HEYGEM_NODE_FFMPEG_READRATE": str(pace)}
    services = [
        node_service(workdir, m["name"], m["port"], m["max_concurrent"], env=env).start()
        for m in config
        if m.get("enabled", True)
    ]
    services.append(dispatcher_service(workdir, machines, port).start())
    return services


def submit(url: str, audio: Path, video: Path, n: int) -> list[str]:
    ids = []
    for i in range(n):
        with audio.open("rb") as a, video.open("rb") as v:
            response = httpx.post(
                f"{url}/tasks",
                files={"audio_file": a, "video_file": v},
                data={"description": f"demo {i + 1}"},
                timeout=60,
            )
        response.raise_for_status()
        ids.append(response.json()["task_id"])
    return ids


def follow(url: str, ids: list[str]) -> list[dict]:
    while True:
        tasks = httpx.post(f"{url}/tasks/batch", json={"task_ids": ids}).json()["tasks"]
        line = "  ".join(
            f"{t['description']}: {t['status']} {t['progress']:.0f}%"
            + (f" on {t['node']}" if t["node"] else "")
            for t in tasks
        )
        print("\r" + line, end="", flush=True)
        if all(t["status"] in ("completed", "failed", "cancelled") for t in tasks):
            print()
            return tasks
        time.sleep(0.5)


def save_results(url: str, tasks: list[dict], out_dir: Path, audio_s: float) -> bool:
    out_dir.mkdir(parents=True, exist_ok=True)
    ok = True
    for task in tasks:
        if task["status"] != "completed":
            print(f"  {task['task_id']}: {task['status']}: {task['error_message']}")
            ok = False
            continue
        path = out_dir / f"{task['task_id']}.mp4"
        path.write_bytes(httpx.get(f"{url}{task['result_url']}", timeout=60).content)
        info = probe(path)
        good = (
            info.video_streams == 1
            and info.audio_streams == 1
            and abs(info.duration_s - audio_s) <= 0.2
        )
        ok &= good
        print(
            f"  {path}: {info.duration_s:.2f}s (audio {audio_s:.2f}s), "
            f"{info.video_streams} video + {info.audio_streams} audio stream "
            f"[{'ok' if good else 'WRONG'}] on {task['node']}"
        )
    return ok


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="heygem-demo", description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=4, help="how many tasks to submit")
    p.add_argument("--machines", type=Path, default=ROOT / "config/machines.json")
    p.add_argument("--port", type=int, default=8101, help="the dispatcher's port")
    p.add_argument("--keep", action="store_true", help="leave the fleet running")
    p.add_argument(
        "--pace",
        type=float,
        default=2.0,
        help="media seconds a node renders per second (0: as fast as it can)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "output")
    args = p.parse_args(argv)
    # SIGTERM ends the demo like Ctrl-C does: through the finally that stops the fleet.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    audio, video = ROOT / "samples/input/audio.mp3", ROOT / "samples/input/video.mp4"
    workdir = Path(tempfile.mkdtemp(prefix="heygem-demo-"))
    print(f"starting the fleet from {args.machines} (logs in {workdir})")
    services = start_fleet(args.machines, workdir, args.port, args.pace)
    url = services[-1].url
    try:
        print(f"dispatcher at {url} (dashboard {url}/, API docs {url}/docs)")
        ids = submit(url, audio, video, args.tasks)
        tasks = follow(url, ids)
        ok = save_results(url, tasks, args.out, probe(audio).duration_s)
        print("all results are playable mp4s of the audio's length" if ok else "PROBLEMS above")
        if args.keep:
            print("fleet running; Ctrl-C to stop")
            while True:
                time.sleep(3600)
        sys.exit(0 if ok else 1)
    except KeyboardInterrupt:
        pass
    finally:
        for service in reversed(services):
            service.stop()


if __name__ == "__main__":
    main()
