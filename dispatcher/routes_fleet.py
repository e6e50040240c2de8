"""The fleet routes: machines, health, metrics and the dashboard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, PlainTextResponse

from dispatcher import __version__
from dispatcher.background import reload_machines
from dispatcher.deps import EngineDep
from dispatcher.engine import Engine, iso
from dispatcher.states import TaskStatus

STATIC = Path(__file__).parent / "static"
router = APIRouter(tags=["fleet"])


def machine_view(engine: Engine) -> list[dict[str, Any]]:
    now = engine.clock()
    in_flight = engine.in_flight()
    running: dict[str, list[str]] = {}
    for task_id, lease in engine.leases.items():
        running.setdefault(lease.node, []).append(task_id)
    views = []
    for node in engine.fleet.nodes.values():
        report = node.report
        views.append(
            {
                "name": node.name,
                "url": node.config.base_url,
                "state": node.state_label(now),
                "health": node.health.value,
                "enabled": node.config.enabled,
                "slots_used": in_flight.get(node.name, 0),
                "slots_total": node.config.max_concurrent,
                "running_tasks": sorted(running.get(node.name, [])),
                "last_error": node.last_error,
                "last_seen_at": iso(node.last_seen_at),
                "jobs_done": node.jobs_done,
                "jobs_failed": node.jobs_failed,
                "speed": round(node.speed, 3) if node.speed is not None else None,
                "ejected_until": iso(node.ejected_until) if node.ejected_until > now else None,
                "backend": report.get("backend"),
                "version": report.get("version"),
                "gpus": report.get("gpus"),
            }
        )
    return views


@router.get("/machines", summary="Every node: health, slots, running tasks, speed")
async def machines(engine: EngineDep) -> dict[str, Any]:
    return {
        "machines": machine_view(engine),
        "config_path": str(engine.settings.machines),
        "config_error": engine.fleet.config_error or None,
        "config_loaded_at": iso(engine.fleet.config_loaded_at),
        "policy": engine.settings.policy.value,
    }


@router.post("/machines/reload", summary="Read machines.json now")
async def reload(engine: EngineDep) -> dict[str, Any]:
    applied = reload_machines(engine)
    return {"applied": applied, **(await machines(engine))}


@router.get("/health", summary="Is the dispatcher up, and can it run work")
async def health(engine: EngineDep) -> dict[str, Any]:
    now = engine.clock()
    accepting = [n.name for n in engine.fleet.nodes.values() if n.accepting(now)]
    counts = engine.store.counts()
    return {
        "status": "ok" if accepting else "degraded",
        "version": __version__,
        "nodes_accepting": len(accepting),
        "nodes_total": len(engine.fleet.nodes),
        "queued": counts.get("pending", 0),
        "processing": counts.get("processing", 0),
        "config_error": engine.fleet.config_error or None,
    }


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
async def metrics(engine: EngineDep) -> str:
    counts = engine.store.counts()
    in_flight = engine.in_flight()
    lines = ["# TYPE heygem_tasks gauge"]
    lines += [f'heygem_tasks{{status="{s.value}"}} {counts.get(s.value, 0)}' for s in TaskStatus]
    lines += [
        "# TYPE heygem_node_slots_used gauge",
        "# TYPE heygem_node_slots_total gauge",
        "# TYPE heygem_node_up gauge",
        "# TYPE heygem_node_jobs_done counter",
        "# TYPE heygem_node_jobs_failed counter",
    ]
    now = engine.clock()
    for node in engine.fleet.nodes.values():
        label = f'{{node="{node.name}"}}'
        lines += [
            f"heygem_node_slots_used{label} {in_flight.get(node.name, 0)}",
            f"heygem_node_slots_total{label} {node.config.max_concurrent}",
            f"heygem_node_up{label} {int(node.accepting(now))}",
            f"heygem_node_jobs_done{label} {node.jobs_done}",
            f"heygem_node_jobs_failed{label} {node.jobs_failed}",
        ]
    return "\n".join(lines) + "\n"


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    return HTMLResponse((STATIC / "dashboard.html").read_text(encoding="utf-8"))
