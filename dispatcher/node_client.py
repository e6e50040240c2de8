"""The dispatcher's side of the node agent protocol: the only place that talks to nodes.

Errors, as the engine sees them:

    NodeError               the node could not do what we asked; ``message`` says what
      +-- NodeUnreachable   connection refused/reset, timeout, or 5xx after retries
      +-- NodeFull          409: no free slot (or the model is busy); nothing started
      +-- JobUnknown        404: the node does not have this job (it restarted, or forgot)
      +-- NodeRejected      another 4xx: the node refused the request as it stands

Transient failures (transport errors, 5xx) are retried with exponential backoff by
tenacity before they are raised. Every call here is safe to repeat: ``POST /jobs`` is
idempotent for a known job id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from dispatcher.fleet import MachineConfig

T = TypeVar("T")
CHUNK = 1024 * 1024


class NodeError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NodeUnreachable(NodeError):
    pass


class NodeFull(NodeError):
    pass


class JobUnknown(NodeError):
    pass


class NodeRejected(NodeError):
    pass


class _Transient(Exception):
    """A 5xx answer: worth another try before it counts."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}: {_detail(response)}")


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])
    return json.dumps(body)[:300]


def _raise_for_status(response: httpx.Response, what: str) -> None:
    code = response.status_code
    if code < 400:
        return
    if code >= 500:
        raise _Transient(response)
    detail = _detail(response)
    if code == 409:
        raise NodeFull(f"{what}: node is full ({detail})")
    if code == 404:
        raise JobUnknown(f"{what}: node does not know the job ({detail})")
    raise NodeRejected(f"{what}: HTTP {code}: {detail}")


class NodeClient:
    def __init__(
        self,
        client: httpx.AsyncClient,
        token: str = "",
        retries: int = 3,
        backoff_s: float = 0.5,
    ) -> None:
        self._client = client
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._retries = retries
        self._backoff_s = backoff_s

    async def _call(self, machine: MachineConfig, what: str, send: Callable[[], Awaitable[T]]) -> T:
        retrying = AsyncRetrying(
            retry=retry_if_exception_type((httpx.TransportError, _Transient)),
            stop=stop_after_attempt(self._retries),
            wait=wait_exponential(multiplier=self._backoff_s, max=10),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await send()
        except (httpx.TransportError, _Transient) as exc:
            reason = str(exc) or type(exc).__name__
            raise NodeUnreachable(f"{what} on {machine.name}: {reason}") from exc
        raise AssertionError("unreachable")  # pragma: no cover - tenacity reraises

    async def health(self, machine: MachineConfig, timeout_s: float) -> dict[str, Any]:
        async def send() -> dict[str, Any]:
            response = await self._client.get(
                f"{machine.base_url}/health", headers=self._headers, timeout=timeout_s
            )
            _raise_for_status(response, "health probe")
            body: dict[str, Any] = response.json()
            return body

        # One try: the probe loop itself is the retry, with thresholds.
        try:
            return await send()
        except (httpx.TransportError, _Transient) as exc:
            raise NodeUnreachable(f"health probe: {exc or type(exc).__name__}") from exc

    async def submit(
        self,
        machine: MachineConfig,
        job_id: str,
        audio: Path,
        video: Path,
        options: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Stream both files to the node as a new job (or find the job it already has)."""

        async def send() -> dict[str, Any]:
            # Reopened on every try: a retried upload starts from the first byte.
            with audio.open("rb") as audio_fh, video.open("rb") as video_fh:
                response = await self._client.post(
                    f"{machine.base_url}/jobs",
                    params={"job_id": job_id},
                    headers=self._headers,
                    data={"options": json.dumps(dict(options))},
                    files={
                        "audio": (audio.name, audio_fh, "application/octet-stream"),
                        "video": (video.name, video_fh, "application/octet-stream"),
                    },
                    timeout=httpx.Timeout(60.0, write=300.0),
                )
            _raise_for_status(response, "upload")
            body: dict[str, Any] = response.json()
            return body

        return await self._call(machine, "upload", send)

    async def job(
        self,
        machine: MachineConfig,
        job_id: str,
        wait_s: float = 0.0,
        seen: tuple[str, float] | None = None,
    ) -> dict[str, Any]:
        """The job's status; with ``wait_s`` and ``seen``, a long poll that answers as soon
        as the job's (state, progress) differs from ``seen`` (an older node answers at once).
        """
        params: dict[str, Any] = {}
        if wait_s > 0 and seen is not None:
            params = {"wait_s": wait_s, "seen_state": seen[0], "seen_progress": seen[1]}

        async def send() -> dict[str, Any]:
            response = await self._client.get(
                f"{machine.base_url}/jobs/{job_id}",
                params=params,
                headers=self._headers,
                timeout=15.0 + wait_s,
            )
            _raise_for_status(response, "status poll")
            body: dict[str, Any] = response.json()
            return body

        return await self._call(machine, "status poll", send)

    async def fetch_result(self, machine: MachineConfig, job_id: str, dest: Path) -> int:
        """Stream the job's result into ``dest`` (atomically: all of it or nothing)."""

        async def send() -> int:
            partial = dest.with_name(dest.name + ".part")
            try:
                size = await download(partial)
            except BaseException:
                partial.unlink(missing_ok=True)  # cancelled or failed: no half file stays
                raise
            os.replace(partial, dest)
            return size

        async def download(partial: Path) -> int:
            size = 0
            async with self._client.stream(
                "GET",
                f"{machine.base_url}/jobs/{job_id}/result",
                headers=self._headers,
                timeout=httpx.Timeout(60.0, read=300.0),
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                _raise_for_status(response, "result download")
                with partial.open("wb") as out:
                    async for chunk in response.aiter_bytes(CHUNK):
                        out.write(chunk)
                        size += len(chunk)
                    out.flush()
                    os.fsync(out.fileno())
            return size

        return await self._call(machine, "result download", send)

    async def delete(self, machine: MachineConfig, job_id: str) -> None:
        async def send() -> None:
            response = await self._client.delete(
                f"{machine.base_url}/jobs/{job_id}", headers=self._headers, timeout=15.0
            )
            if response.status_code == 404:  # already gone: what we wanted
                return
            _raise_for_status(response, "cancel")

        await self._call(machine, "cancel", send)
