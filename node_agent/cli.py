"""``heygem-node`` / ``python -m node_agent``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import uvicorn

from heygem_common.cli import settings_from_args
from heygem_common.logs import configure_logging
from node_agent.app import create_app
from node_agent.settings import NodeSettings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="heygem-node",
        description="Node agent: wraps one lip-sync model instance for the dispatcher. "
        "Every flag can also be set as an environment variable HEYGEM_NODE_<FLAG>.",
    )
    p.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="port to listen on (default 8000)")
    p.add_argument(
        "--backend",
        choices=["ffmpeg", "heygem", "command"],
        help="what runs the jobs (default ffmpeg)",
    )
    p.add_argument(
        "--max-concurrent",
        dest="max_concurrent",
        type=int,
        help="jobs run at once; more get 409 (default 1)",
    )
    p.add_argument("--data-dir", dest="data_dir", help="where jobs keep their files")
    p.add_argument("--name", help="name shown in logs and /health")
    p.add_argument("--token", help="shared secret the dispatcher must send")
    p.add_argument(
        "--heygem-url",
        dest="heygem_url",
        help="HeyGem gen-video container (default http://127.0.0.1:8383)",
    )
    p.add_argument(
        "--heygem-data-dir",
        dest="heygem_data_dir",
        help="host folder mounted at /code/data in the HeyGem container",
    )
    p.add_argument(
        "--command",
        help="command backend: argv template with {audio} {video} {output} {workdir} {job_id}",
    )
    p.add_argument(
        "--command-progress-regex",
        dest="command_progress_regex",
        help="command backend: regex whose group 1 is the percent done",
    )
    return p


def main(argv: Sequence[str] | None = None) -> None:
    settings = settings_from_args(build_parser(), NodeSettings, argv)
    configure_logging("node")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=10,
    )
