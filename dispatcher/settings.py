"""Dispatcher settings: command-line flags override environment variables (HEYGEM_*)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from dispatcher.scheduler import Policy

GIB = 1024**3


class DispatcherSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HEYGEM_", extra="ignore")

    host: str = "0.0.0.0"
    port: int = Field(8101, ge=1, le=65535)
    machines: Path = Path("config/machines.json")
    data_dir: Path = Path("data/dispatcher")
    # Shared secret sent to every node agent (Authorization: Bearer ...); empty: none.
    node_token: str = ""
    # The address clients reach us at, for result links in callbacks; empty: relative links.
    public_url: str = ""

    max_upload_bytes: int = Field(2 * GIB, ge=1)
    # New submits answer 507 when the data dir's disk has less free space than this.
    min_free_disk_bytes: int = Field(1 * GIB, ge=0)

    policy: Policy = Policy.SPEED_AWARE
    max_attempts: int = Field(3, ge=1, le=20)
    # No progress for this long ends the attempt (HeyGem's "stuck at 20 %").
    stall_timeout_s: float = Field(600.0, gt=0)
    task_timeout_s: float = Field(3 * 3600.0, gt=0)
    sync_timeout_s: float = Field(3600.0, gt=0)

    poll_interval_s: float = Field(1.0, gt=0)
    health_interval_s: float = Field(5.0, gt=0)
    health_timeout_s: float = Field(3.0, gt=0)
    # Consecutive failed probes before a node is unhealthy / passed probes to come back.
    unhealthy_after: int = Field(2, ge=1)
    healthy_after: int = Field(1, ge=1)
    # Consecutive failed jobs that eject a node for a cool-down (which doubles each time).
    eject_after_failures: int = Field(3, ge=1)
    eject_base_s: float = Field(30.0, gt=0)
    machines_reload_interval_s: float = Field(2.0, gt=0)
    # Retries of one HTTP call to a node before it counts as a failure of the attempt.
    node_http_retries: int = Field(3, ge=1)
    node_http_backoff_s: float = Field(0.5, ge=0)

    retention_s: float = Field(24 * 3600.0, gt=0)
    cleanup_interval_s: float = Field(300.0, gt=0)
    callback_timeout_s: float = Field(10.0, gt=0)
    callback_max_attempts: int = Field(12, ge=1)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "tasks.sqlite3"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"
