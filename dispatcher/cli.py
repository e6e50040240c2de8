"""``heygem-dispatcher`` / ``python -m dispatcher``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import uvicorn

from dispatcher.app import create_app
from dispatcher.settings import DispatcherSettings
from heygem_common.cli import settings_from_args
from heygem_common.logs import configure_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="heygem-dispatcher",
        description="Multi-HeyGem dispatcher: one endpoint for a fleet of lip-sync nodes. "
        "Every flag can also be set as an environment variable HEYGEM_<FLAG>.",
    )
    p.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="port to listen on (default 8101)")
    p.add_argument("--machines", help="machines.json (default config/machines.json)")
    p.add_argument(
        "--data-dir",
        dest="data_dir",
        help="task store, uploads and results (default data/dispatcher)",
    )
    p.add_argument("--node-token", dest="node_token", help="shared secret sent to nodes")
    p.add_argument(
        "--policy",
        choices=["speed_aware", "least_loaded", "round_robin"],
        help="how a node is chosen (default speed_aware)",
    )
    p.add_argument(
        "--max-attempts",
        dest="max_attempts",
        type=int,
        help="attempts per task before it fails (default 3)",
    )
    p.add_argument(
        "--stall-timeout",
        dest="stall_timeout_s",
        type=float,
        help="seconds without progress before an attempt is abandoned",
    )
    p.add_argument(
        "--task-timeout",
        dest="task_timeout_s",
        type=float,
        help="seconds one attempt may run at most",
    )
    p.add_argument(
        "--retention",
        dest="retention_s",
        type=float,
        help="seconds finished tasks keep their files (default 86400)",
    )
    p.add_argument("--public-url", dest="public_url", help="base URL used in callbacks")
    return p


def main(argv: Sequence[str] | None = None) -> None:
    settings = settings_from_args(build_parser(), DispatcherSettings, argv)
    configure_logging("dispatcher")
    # Uvicorn's graceful shutdown on SIGTERM stops accepting connections and lets requests
    # in flight (uploads included) finish before the lifespan ends.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=30,
    )
