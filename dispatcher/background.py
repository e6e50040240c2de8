"""The dispatcher's background loops besides dispatching: node health, machines.json reload,
callbacks, retention. Each loop is a thin shell around one round that tests can call."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import structlog

from dispatcher.engine import Engine
from dispatcher.fleet import NodeRuntime, probe_result
from dispatcher.node_client import NodeError
from dispatcher.store import Callback

log = structlog.get_logger()


# -- health ----------------------------------------------------------------------------
async def probe_node(engine: Engine, node: NodeRuntime) -> None:
    settings = engine.settings
    try:
        report = await engine.nodes.health(node.config, settings.health_timeout_s)
        ok = report.get("status") != "unhealthy"
        error = "" if ok else f"backend unhealthy: {report.get('backend_detail', '')}"
    except NodeError as exc:
        report, ok, error = {}, False, exc.message
    before = node.health
    node.health = probe_result(node, ok, settings.unhealthy_after, settings.healthy_after)
    if ok:
        node.probe_failures, node.probe_successes = 0, node.probe_successes + 1
        node.report, node.last_seen_at = report, engine.clock()
    else:
        node.probe_failures, node.probe_successes = node.probe_failures + 1, 0
        node.last_error = error
    if node.health is not before:
        log.info("node health changed", node=node.name, health=node.health.value, error=error)
        engine.wake.set()
    if ok:
        await delete_orphans(engine, node, report)


async def delete_orphans(engine: Engine, node: NodeRuntime, report: dict[str, Any]) -> None:
    """Jobs on the node that no processing task owns: left over from a crash or a cancel."""
    jobs = report.get("jobs")
    if not isinstance(jobs, dict):
        return
    owned = {lease.job_id for lease in engine.leases.values() if lease.node == node.name}
    for job_id in [j for j in jobs if j not in owned]:
        try:
            await engine.nodes.delete(node.config, job_id)
            node.forget_reported(job_id)  # its slot is free now, not at the next probe
            engine.wake.set()
            log.info("deleted orphan job", node=node.name, job_id=job_id)
        except NodeError as exc:
            log.info("orphan job not deleted yet", node=node.name, job_id=job_id, error=exc.message)


async def probe_all(engine: Engine) -> None:
    await asyncio.gather(*(probe_node(engine, n) for n in list(engine.fleet.nodes.values())))


async def health_forever(engine: Engine) -> None:
    while True:
        try:
            await probe_all(engine)
        except Exception:
            log.exception("health round failed")
        await asyncio.sleep(engine.settings.health_interval_s)


# -- machines.json -----------------------------------------------------------------------
def _fingerprint(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def reload_machines(engine: Engine) -> bool:
    path = engine.settings.machines
    applied = engine.fleet.load_file(path)
    if applied:
        log.info("machines loaded", path=str(path), nodes=sorted(engine.fleet.nodes))
    else:
        log.error("machines.json refused", error=engine.fleet.config_error)
    engine.fleet.forget_drained({t: lease.node for t, lease in engine.leases.items()})
    engine.wake.set()
    return applied


async def reload_forever(engine: Engine) -> None:
    seen = _fingerprint(engine.settings.machines)
    while True:
        await asyncio.sleep(engine.settings.machines_reload_interval_s)
        current = _fingerprint(engine.settings.machines)
        if current != seen:
            seen = current
            reload_machines(engine)
            await probe_all(engine)  # a new node is known healthy (or not) at once
        else:
            engine.fleet.forget_drained({t: lease.node for t, lease in engine.leases.items()})


# -- callbacks ---------------------------------------------------------------------------
def callback_backoff(attempt: int) -> float:
    """Seconds before the next try after ``attempt`` failed ones: 2, 4, 8 … capped at 10 min."""
    return float(min(600, 2**attempt))


async def deliver_due_callbacks(engine: Engine, client: httpx.AsyncClient) -> None:
    # Concurrently: one slow receiver must not hold up everybody else's callbacks.
    due = engine.store.due_callbacks(engine.clock())
    await asyncio.gather(*(_deliver(engine, client, callback) for callback in due))


async def _deliver(engine: Engine, client: httpx.AsyncClient, callback: Callback) -> None:
    settings = engine.settings
    try:
        response = await client.post(
            callback.url, json=callback.body, timeout=settings.callback_timeout_s
        )
        error = "" if response.is_success else f"HTTP {response.status_code}"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"
    now = engine.clock()
    if not error:
        engine.store.callback_delivered(callback.id, now)
        return
    tries = callback.attempts + 1
    retry_at = now + callback_backoff(tries) if tries < settings.callback_max_attempts else None
    engine.store.callback_failed(callback.id, error, retry_at, now)
    log.warning(
        "callback failed",
        task_id=callback.task_id,
        url=callback.url,
        error=error,
        gave_up=retry_at is None,
    )


def progress_sender(
    client: httpx.AsyncClient, timeout_s: float
) -> Callable[[str, dict[str, Any]], Awaitable[None]]:
    """Progress callbacks are best effort: one try, no outbox (the terminal one is durable)."""

    async def send(url: str, body: dict[str, Any]) -> None:
        try:
            await client.post(url, json=body, timeout=timeout_s)
        except httpx.HTTPError as exc:
            log.info("progress callback not delivered", url=url, error=str(exc))

    return send


async def callbacks_forever(engine: Engine, client: httpx.AsyncClient) -> None:
    while True:
        try:
            await deliver_due_callbacks(engine, client)
        except Exception:
            log.exception("callback round failed")
        next_due = engine.store.next_callback_due()
        wait = 5.0 if next_due is None else max(0.05, min(5.0, next_due - engine.clock()))
        try:
            await asyncio.wait_for(engine.callbacks_wake.wait(), wait)
        except TimeoutError:
            pass
        engine.callbacks_wake.clear()


# -- retention -------------------------------------------------------------------------
def expire_files(engine: Engine) -> int:
    """Delete inputs and results of tasks finished longer than the retention ago."""
    settings = engine.settings
    expired = engine.store.expired_files(engine.clock() - settings.retention_s)
    for task in expired:
        shutil.rmtree(settings.uploads_dir / task.id, ignore_errors=True)
        if task.result_path:
            Path(task.result_path).unlink(missing_ok=True)
        engine.store.update(task.id, files_expired=True)
    if expired:
        log.info("expired task files", count=len(expired))
    return len(expired)


async def cleanup_forever(engine: Engine) -> None:
    while True:
        try:
            expire_files(engine)
        except Exception:
            log.exception("cleanup round failed")
        await asyncio.sleep(engine.settings.cleanup_interval_s)
