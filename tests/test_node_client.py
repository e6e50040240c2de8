"""The dispatcher's node client against node answers we script with httpx.MockTransport."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from dispatcher.fleet import MachineConfig
from dispatcher.node_client import JobUnknown, NodeClient, NodeFull, NodeUnreachable

pytestmark = pytest.mark.anyio
MACHINE = MachineConfig(name="a", host="a.test", port=9000)


async def test_a_download_cut_short_leaves_no_partial_file(tmp_path: Path) -> None:
    started = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 1024
        started.set()
        await asyncio.sleep(30)
        yield b"never"

    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body()))
    async with httpx.AsyncClient(transport=transport) as http:
        download = asyncio.create_task(
            NodeClient(http).fetch_result(MACHINE, "t.1", tmp_path / "t.mp4")
        )
        await started.wait()
        download.cancel()
        with pytest.raises(asyncio.CancelledError):
            await download
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("status", "error", "words"),
    [
        (409, NodeFull, "upload: node is full (no free slot on this node)"),
        (404, JobUnknown, "node does not know the job"),
        (503, NodeUnreachable, "upload on a: HTTP 503: no free slot on this node"),
    ],
)
async def test_answers_become_errors_that_say_what_happened(
    tmp_path: Path, status: int, error: type[Exception], words: str
) -> None:
    calls = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(status, json={"detail": "no free slot on this node"})

    (tmp_path / "a.mp3").write_bytes(b"a")
    (tmp_path / "v.mp4").write_bytes(b"v")
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        client = NodeClient(http, retries=3, backoff_s=0)
        with pytest.raises(error) as caught:
            await client.submit(MACHINE, "t.1", tmp_path / "a.mp3", tmp_path / "v.mp4", {})
    assert words in str(caught.value)
    assert len(calls) == (3 if status >= 500 else 1)  # only 5xx is worth another try
