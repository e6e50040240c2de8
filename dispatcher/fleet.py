"""The machines: what config/machines.json says, and what we have learned about each.

The file keeps the seed's schema (``name, host, port, max_concurrent, enabled``). A file that
does not parse or validate is refused whole: the last good fleet stays and the error is kept
for ``GET /machines``. A machine removed from the file, or set ``enabled: false``, drains: it
gets no new work and its running tasks finish.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dispatcher.scheduler import NodeSnapshot


class MachineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str = Field(min_length=1, max_length=100)
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    max_concurrent: int = Field(1, ge=1, le=64)
    enabled: bool = True
    scheme: str = "http"
    # Optional hint: processing seconds per second of output media (e.g. 0.5 for a fast GPU,
    # 2.0 for a slow one). Used for scheduling and ETAs until the node's speed is measured.
    speed: float | None = Field(None, gt=0)

    @field_validator("scheme")
    @classmethod
    def _http_only(cls, value: str) -> str:
        if value not in ("http", "https"):
            raise ValueError("scheme must be http or https")
        return value

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


class _MachinesFile(BaseModel):
    machines: list[MachineConfig]


class ConfigError(ValueError):
    pass


def parse_machines(text: str) -> list[MachineConfig]:
    """The machines in a machines.json text, or ConfigError saying what to fix."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"not valid JSON: {exc}") from None
    try:
        machines = _MachinesFile.model_validate(raw).machines
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(problems) from None
    names = [m.name for m in machines]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"machine names must be unique; repeated: {', '.join(duplicates)}")
    return machines


class Health(StrEnum):
    UNKNOWN = "unknown"  # not probed yet: gets work, so a new node is used at once
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class NodeMode(StrEnum):
    ACTIVE = "active"
    DRAINING = "draining"  # removed from the file: finish what runs, take nothing new
    DISABLED = "disabled"  # enabled: false


@dataclass
class NodeRuntime:
    """What the dispatcher knows about one node beyond its config."""

    config: MachineConfig
    mode: NodeMode = NodeMode.ACTIVE
    health: Health = Health.UNKNOWN
    probe_failures: int = 0
    probe_successes: int = 0
    last_error: str = ""
    last_seen_at: float | None = None
    report: dict[str, Any] = field(default_factory=dict)  # the node's last /health answer
    job_failures_in_row: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    refused_until: float = 0.0  # answered 409 (full or model busy) until about then
    jobs_done: int = 0
    jobs_failed: int = 0
    speed: float | None = None  # processing seconds per second of media

    @property
    def name(self) -> str:
        return self.config.name

    def accepting(self, now: float) -> bool:
        return (
            self.mode is NodeMode.ACTIVE
            and self.health is not Health.UNHEALTHY
            and now >= self.ejected_until
            and now >= self.refused_until
        )

    def reported_running(self) -> list[str]:
        running = self.report.get("running", [])
        return [str(j) for j in running] if isinstance(running, list) else []

    def assume_running(self, job_id: str) -> None:
        """A job we gave up on may still run on the node until it is deleted there: count
        its slot as taken (the next health report replaces this guess with the truth)."""
        running = self.report.setdefault("running", [])
        if isinstance(running, list) and job_id not in running:
            running.append(job_id)

    def forget_reported(self, job_id: str) -> None:
        """A job we just ended: do not let the last (older) report count it as running."""
        running = self.report.get("running")
        if isinstance(running, list) and job_id in running:
            running.remove(job_id)

    def state_label(self, now: float) -> str:
        if self.mode is not NodeMode.ACTIVE:
            return self.mode.value
        if now < self.ejected_until:
            return "ejected"
        return self.health.value


def probe_result(node: NodeRuntime, ok: bool, unhealthy_after: int, healthy_after: int) -> Health:
    """Health after one probe, with thresholds so one lost packet does not flap a node."""
    if ok:
        successes = node.probe_successes + 1
        if node.health is Health.UNHEALTHY and successes < healthy_after:
            return Health.UNHEALTHY
        return Health.HEALTHY
    failures = node.probe_failures + 1
    if failures >= unhealthy_after or node.health is Health.UNHEALTHY:
        return Health.UNHEALTHY
    return node.health


def ejection_cooldown(ejections: int, base_s: float, cap_s: float = 3600.0) -> float:
    """Seconds a node stays ejected the n-th time (1-based): doubles each time, capped."""
    return min(cap_s, base_s * 2 ** max(0, ejections - 1))


class Fleet:
    def __init__(self, clock: Any = time.time) -> None:
        self.nodes: dict[str, NodeRuntime] = {}
        self.config_error: str = ""
        self.config_loaded_at: float | None = None
        self._clock = clock

    def apply(self, machines: list[MachineConfig]) -> None:
        """Take a new, valid machine list; keep what we learned about known nodes."""
        seen = set()
        for config in machines:
            seen.add(config.name)
            node = self.nodes.get(config.name)
            if node is None or node.config.base_url != config.base_url:
                node = NodeRuntime(config)
                self.nodes[config.name] = node
            node.config = config
            node.mode = NodeMode.ACTIVE if config.enabled else NodeMode.DISABLED
            if node.speed is None:
                node.speed = config.speed
        for name, node in self.nodes.items():
            if name not in seen:
                node.mode = NodeMode.DRAINING
        self.config_error = ""
        self.config_loaded_at = self._clock()

    def load_file(self, path: Path) -> bool:
        """Apply the file if it is valid; otherwise keep the fleet and remember why."""
        try:
            machines = parse_machines(path.read_text(encoding="utf-8"))
        except (OSError, ConfigError) as exc:
            self.config_error = f"{path}: {exc} (keeping the last good fleet)"
            return False
        self.apply(machines)
        return True

    def forget_drained(self, leases: Mapping[str, str]) -> None:
        """Drop removed machines once nothing runs on them any more."""
        busy = set(leases.values())
        for name in [n for n, node in self.nodes.items() if node.mode is NodeMode.DRAINING]:
            if name not in busy:
                del self.nodes[name]

    def snapshots(
        self, in_flight: Mapping[str, int], busy_until: Mapping[str, tuple[float, ...]]
    ) -> list[NodeSnapshot]:
        now = self._clock()
        return [
            NodeSnapshot(
                name=node.name,
                max_concurrent=node.config.max_concurrent,
                in_flight=in_flight.get(node.name, 0),
                accepting=node.accepting(now),
                speed=node.speed,
                busy_until=busy_until.get(node.name, ()),
            )
            for node in self.nodes.values()
        ]
