"""Start a local fleet of real processes: the demo and the end-to-end tests share this."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Service:
    """One running process of ours: a dispatcher or a node agent."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_path: str = "/health", timeout_s: float = 30.0) -> Service:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        # The child keeps its own copy of the descriptor; ours is closed at once.
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.wait_ready(ready_path, timeout_s)
        return self

    def wait_ready(self, path: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}; "
                    f"see {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(self.url + path, timeout=1.0).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: the crash we promise to survive."""
        self._signal(signal.SIGKILL)

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def _signal(self, signum: int) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signum)
            if signum == signal.SIGKILL:
                self.process.wait(10)


def node_service(
    workdir: Path,
    name: str,
    port: int | None = None,
    max_concurrent: int = 1,
    backend: str = "ffmpeg",
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> Service:
    port = port or free_port()
    argv = [
        sys.executable,
        "-m",
        "node_agent",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend",
        backend,
        "--max-concurrent",
        str(max_concurrent),
        "--data-dir",
        str(workdir / name),
        "--name",
        name,
        *(extra or []),
    ]
    return Service(name, argv, port, workdir / f"{name}.log", env or {})


def dispatcher_service(
    workdir: Path,
    machines: Path,
    port: int | None = None,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
    data_dir: Path | None = None,
) -> Service:
    port = port or free_port()
    argv = [
        sys.executable,
        "-m",
        "dispatcher",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--machines",
        str(machines),
        "--data-dir",
        str(data_dir or workdir / "dispatcher"),
        *(extra or []),
    ]
    return Service("dispatcher", argv, port, workdir / "dispatcher.log", env or {})


def write_machines(path: Path, nodes: list[dict[str, Any]]) -> None:
    """Write machines.json atomically, as an operator's editor would (rename over)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machines": nodes}, indent=2))
    os.replace(tmp, path)


def machine_entry(service: Service, max_concurrent: int, enabled: bool = True) -> dict[str, Any]:
    return {
        "name": service.name,
        "host": "127.0.0.1",
        "port": service.port,
        "max_concurrent": max_concurrent,
        "enabled": enabled,
    }
