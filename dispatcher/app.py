"""``create_app(settings)``: the lifespan owns the store, the HTTP client and the loops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import structlog
from fastapi import FastAPI

from dispatcher import __version__, routes_fleet, routes_tasks
from dispatcher.background import (
    callbacks_forever,
    cleanup_forever,
    health_forever,
    progress_sender,
    reload_forever,
    reload_machines,
)
from dispatcher.engine import Engine
from dispatcher.fleet import Fleet
from dispatcher.node_client import NodeClient
from dispatcher.settings import DispatcherSettings
from dispatcher.store import TaskStore

log = structlog.get_logger()


def create_app(settings: DispatcherSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.uploads_dir.mkdir(parents=True, exist_ok=True)
        settings.results_dir.mkdir(parents=True, exist_ok=True)
        store = TaskStore(settings.db_path)
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
        async with httpx.AsyncClient(limits=limits) as http:
            nodes = NodeClient(
                http, settings.node_token, settings.node_http_retries, settings.node_http_backoff_s
            )
            engine = Engine(
                settings,
                store,
                Fleet(),
                nodes,
                notify_progress=progress_sender(http, settings.callback_timeout_s),
            )
            app.state.engine = engine
            reload_machines(engine)
            engine.recover()
            loops = [
                asyncio.create_task(engine.dispatch_forever()),
                asyncio.create_task(health_forever(engine)),
                asyncio.create_task(reload_forever(engine)),
                asyncio.create_task(callbacks_forever(engine, http)),
                asyncio.create_task(cleanup_forever(engine)),
            ]
            log.info(
                "dispatcher ready",
                port=settings.port,
                nodes=sorted(engine.fleet.nodes),
                data_dir=str(settings.data_dir),
            )
            try:
                yield
            finally:
                for loop in loops:
                    loop.cancel()
                for loop in loops:
                    with contextlib.suppress(asyncio.CancelledError):
                        await loop
                # Node jobs keep running; the next start re-attaches to them.
                await engine.stop()
                store.close()

    app = FastAPI(
        title="Multi-HeyGem dispatcher",
        version=__version__,
        description="Spreads lip-sync video tasks over a fleet of GPU nodes.",
        lifespan=lifespan,
    )
    app.include_router(routes_tasks.router)
    app.include_router(routes_fleet.router)
    return app
