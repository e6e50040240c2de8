"""What the node's GPUs are doing, read from ``nvidia-smi`` for the health report.

Best effort by design: a node without NVIDIA tools (the ffmpeg demo, a laptop) or with a
broken driver still works, it just reports no GPU figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from typing import Any

NVIDIA_SMI_ARGS = (
    "--query-gpu=name,memory.used,memory.total,utilization.gpu",
    "--format=csv,noheader,nounits",
)
TIMEOUT_S = 5.0
# How nvidia-smi writes a value a GPU does not report: "[N/A]", "[Not Supported]", ...
_UNAVAILABLE = re.compile(r"\[[^\]]*\]|N/A", re.IGNORECASE)


async def read_gpus(timeout_s: float = TIMEOUT_S) -> list[dict[str, Any]] | None:
    """One dict per GPU; None when nvidia-smi is absent or fails. Never raises."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        stdout = await _run(exe, timeout_s)
    except (OSError, TimeoutError):
        return None
    return None if stdout is None else parse_nvidia_smi(stdout)


async def _run(exe: str, timeout_s: float) -> str | None:
    process = await asyncio.create_subprocess_exec(
        exe,
        *NVIDIA_SMI_ARGS,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        stdout, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    except BaseException:
        # A wedged driver can make nvidia-smi hang for minutes; never leave it behind.
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    if process.returncode != 0:  # e.g. "couldn't communicate with the NVIDIA driver"
        return None
    return stdout.decode(errors="replace")


def parse_nvidia_smi(text: str) -> list[dict[str, Any]]:
    """Parse ``--format=csv,noheader,nounits`` output; lines that are not a GPU are skipped."""
    gpus = []
    for line in text.splitlines():
        gpu = _parse_line(line)
        if gpu is not None:
            gpus.append(gpu)
    return gpus


def _parse_line(line: str) -> dict[str, Any] | None:
    # Split from the right: the three numbers never hold a comma, a product name might.
    fields = [field.strip() for field in line.rsplit(",", 3)]
    if len(fields) != 4 or not fields[0]:
        return None
    name, *figures = fields
    if not all(_is_figure(figure) for figure in figures):
        return None
    used, total, utilization = (_number(figure) for figure in figures)
    return {
        "name": name,
        "memory_used_mb": used,
        "memory_total_mb": total,
        "utilization_pct": utilization,
    }


def _is_figure(text: str) -> bool:
    return _number(text) is not None or _UNAVAILABLE.fullmatch(text) is not None


def _number(text: str) -> int | None:
    try:
        return round(float(text))
    except (ValueError, OverflowError):  # "[N/A]", "nan", "inf"
        return None
