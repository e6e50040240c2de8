"""Reading GPU figures from nvidia-smi: the parser over real-looking output, and a fake binary."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from node_agent.gpu import parse_nvidia_smi, read_gpus


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def gpu(name: str, used: int | None, total: int | None, util: int | None) -> dict[str, Any]:
    return {
        "name": name,
        "memory_used_mb": used,
        "memory_total_mb": total,
        "utilization_pct": util,
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "NVIDIA GeForce RTX 4090, 18342, 24564, 97\n",
            [gpu("NVIDIA GeForce RTX 4090", 18342, 24564, 97)],
            id="one busy gpu",
        ),
        pytest.param(
            "NVIDIA A10, 1, 23028, 0\nNVIDIA A10, 21544, 23028, 100\n",
            [gpu("NVIDIA A10", 1, 23028, 0), gpu("NVIDIA A10", 21544, 23028, 100)],
            id="two gpus",
        ),
        pytest.param(
            "NVIDIA GeForce RTX 5090, 0, 32607, 0\r\n\r\n",
            [gpu("NVIDIA GeForce RTX 5090", 0, 32607, 0)],
            id="crlf and blank lines",
        ),
        pytest.param(
            "NVIDIA A100-SXM4-40GB MIG 3g.20gb, [N/A], [N/A], [N/A]\n",
            [gpu("NVIDIA A100-SXM4-40GB MIG 3g.20gb", None, None, None)],
            id="mig without figures",
        ),
        pytest.param(
            "NVIDIA GeForce GTX 1650, 512, 4096, [Not Supported]\n",
            [gpu("NVIDIA GeForce GTX 1650", 512, 4096, None)],
            id="laptop without utilization",
        ),
        pytest.param(
            "Tesla T4, Rev. B, 300, 15360, 12\n",
            [gpu("Tesla T4, Rev. B", 300, 15360, 12)],
            id="comma in the name",
        ),
        pytest.param(
            "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
            "Make sure that the latest NVIDIA driver is installed and running.\n",
            [],
            id="driver failure text",
        ),
        pytest.param("No devices were found\n", [], id="no devices"),
        pytest.param(
            "name, memory.used [MiB], memory.total [MiB], utilization.gpu [%]\n", [], id="header"
        ),
        pytest.param("", [], id="empty"),
    ],
)
def test_parse_nvidia_smi(text: str, expected: list[dict[str, Any]]) -> None:
    assert parse_nvidia_smi(text) == expected


def fake_nvidia_smi(folder: Path, body: str) -> None:
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)


@pytest.mark.anyio
async def test_read_gpus_runs_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvidia_smi(tmp_path, 'echo "NVIDIA L4, 100, 23034, 3"  # args: "$@"')
    monkeypatch.setenv("PATH", str(tmp_path))
    assert await read_gpus() == [gpu("NVIDIA L4", 100, 23034, 3)]


@pytest.mark.anyio
async def test_read_gpus_without_nvidia_smi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert await read_gpus() is None


@pytest.mark.anyio
async def test_read_gpus_when_the_driver_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvidia_smi(tmp_path, "echo 'NVIDIA-SMI has failed'; exit 9")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert await read_gpus() is None


@pytest.mark.anyio
async def test_read_gpus_gives_up_on_a_hung_nvidia_smi(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvidia_smi(tmp_path, "exec sleep 30")
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    started = time.monotonic()
    assert await read_gpus(timeout_s=0.2) is None
    assert time.monotonic() - started < 2.0
