"""Node agent settings: command-line flags override environment variables (HEYGEM_NODE_*)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BackendName = Literal["ffmpeg", "heygem", "command"]


class NodeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HEYGEM_NODE_", extra="ignore")

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    backend: BackendName = "ffmpeg"
    max_concurrent: int = Field(1, ge=1, le=64)
    data_dir: Path = Path("data/node")
    name: str = ""  # shown in logs and /health; defaults to host:port
    # Shared secret with the dispatcher; empty means no authentication (local demo only).
    token: str = ""
    max_upload_bytes: int = Field(2 * 1024**3, ge=1)
    # Finished jobs whose result nobody fetched are forgotten after this long.
    job_retention_s: float = Field(24 * 3600, gt=0)

    # ffmpeg backend
    ffmpeg_preset: str = "veryfast"
    # Read inputs at this multiple of real time (0: as fast as possible). 1.0 makes a job
    # take as long as its audio, like a GPU model would: useful for demos and failure tests.
    ffmpeg_readrate: float = Field(0.0, ge=0)

    # heygem backend: the Duix.Heygem gen-video container
    heygem_url: str = "http://127.0.0.1:8383"
    # The host folder mounted at /code/data inside the container.
    heygem_data_dir: Path = Path("/root/heygem_data/face2face")
    # How the container sees that folder.
    heygem_container_dir: str = "/code/data"
    heygem_poll_interval_s: float = Field(2.0, gt=0)
    heygem_request_timeout_s: float = Field(10.0, gt=0)

    # command backend: argv template with {audio} {video} {output} {workdir} {job_id}
    command: str = ""
    # A regex with one group that captures a percentage from a line of the command's output.
    command_progress_regex: str = ""

    @field_validator("command_progress_regex")
    @classmethod
    def _regex_compiles(cls, value: str) -> str:
        import re

        if value:
            try:
                pattern = re.compile(value)
            except re.error as exc:
                raise ValueError(f"command_progress_regex does not compile: {exc}") from exc
            if pattern.groups < 1:
                raise ValueError("command_progress_regex needs one group capturing the percent")
        return value

    @property
    def display_name(self) -> str:
        return self.name or f"{self.host}:{self.port}"
