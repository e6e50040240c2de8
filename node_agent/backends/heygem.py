"""The HeyGem backend: drive one Duix.Heygem gen-video container through its HTTP API.

The container only reads files from its own volume, so a job goes like this:

1. stage the audio and video into ``heygem_data_dir/temp`` (hard link, or copy across
   filesystems) under names that start with the job id;
2. ``POST /easy/submit`` with the in-container paths and ``code = job_id``;
3. poll ``GET /easy/query?code=...`` every ``heygem_poll_interval_s`` until status 2 or 3;
4. move ``{code}-r.mp4`` to ``spec.output``.

The terminal query record (``status``, ``progress``, ``result``, ``msg`` and, on newer
images, ``cost``, ``video_duration``, ``width``, ``height``) is written as JSON to
``spec.workdir / "backend_result.json"`` so the job manager can expose it. HeyGem deletes
the record after the first query that returns it, so it is read exactly once.

There is no stall timeout here on purpose: the known "stuck at 20 %" hang polls forever
until the dispatcher, which owns stall detection, cancels the job. HeyGem cannot cancel,
so after that the container stays busy with the orphaned task; ``probe()`` reports it as
not ok until the task ends (or the container restarts), then removes its files.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import httpx
import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from node_agent.backends.base import (
    Backend,
    BackendBusy,
    BackendError,
    BackendHealth,
    JobSpec,
    ProgressFn,
)
from node_agent.settings import NodeSettings

log = structlog.get_logger(__name__)

SleepFn = Callable[[float], Awaitable[Any]]

# In a job's workdir once its submit was sent (see adopt_leftover).
SUBMITTED_MARK = "heygem_submitted"

# Answer codes of the HeyGem envelope {code, success, msg, data}.
OK = 10000
BUSY = 10001
BAD_PARAMETER = 10002
LOCK_ERROR = 10003
NOT_FOUND = 10004
SYSTEM_ERROR = 9999
CODE_MEANINGS = {
    BUSY: "busy",
    BAD_PARAMETER: "bad parameter",
    LOCK_ERROR: "lock error",
    NOT_FOUND: "task not found",
    SYSTEM_ERROR: "system error",
}

# 0/1 flags of /easy/submit that a job may set through its options, with our defaults.
SUBMIT_FLAGS: Mapping[str, int] = {"watermark_switch": 0, "digital_auth": 0, "chaofen": 0, "pn": 1}

REQUEST_ATTEMPTS = 4  # first try + 3 retries, waiting 1, 2, 4 s in between
RESULT_FILE = "backend_result.json"
# HeyGem builds file names from the code, so keep it to characters every filesystem takes.
_SAFE_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class TaskStatus(IntEnum):
    RUNNING = 1
    SUCCEEDED = 2
    FAILED = 3


@dataclass(frozen=True)
class Envelope:
    code: int
    msg: str
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskRecord:
    status: TaskStatus
    progress: float
    message: str
    result: str
    raw: Mapping[str, Any] = field(default_factory=dict)


# --- pure helpers -------------------------------------------------------------------------


def container_path(container_dir: str, name: str) -> str:
    """Where the container sees a file we put in ``heygem_data_dir/temp``."""
    return f"{container_dir.rstrip('/')}/temp/{name}"


def option_flag(name: str, value: Any) -> int:
    """A 0/1 submit flag from a job option that may have come through a form as text."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("0", "1", "true", "false"):
        return int(value.strip().lower() in ("1", "true"))
    raise BackendError(f"option {name} must be 0 or 1, got {value!r}")


def submit_payload(
    code: str, audio_name: str, video_name: str, container_dir: str, options: Mapping[str, Any]
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "audio_url": container_path(container_dir, audio_name),
        "video_url": container_path(container_dir, video_name),
        "code": code,
    }
    for name, default in SUBMIT_FLAGS.items():
        payload[name] = option_flag(name, options[name]) if name in options else default
    return payload


def parse_envelope(body: Any) -> Envelope | None:
    """The ``{code, success, msg, data}`` envelope, or None if ``body`` is not one."""
    if not isinstance(body, Mapping) or "code" not in body:
        return None
    try:
        code = int(body["code"])
    except (TypeError, ValueError):
        return None
    data = body.get("data")
    # Some images answer the submit with "msg": 10000 (a number), so never trust its type.
    msg = "" if body.get("msg") is None else str(body.get("msg"))
    return Envelope(code=code, msg=msg, data=data if isinstance(data, Mapping) else {})


def check_submit_response(envelope: Envelope, code: str) -> None:
    """Raise unless HeyGem accepted the submit."""
    if envelope.code == OK:
        return
    meaning = CODE_MEANINGS.get(envelope.code, "unknown code")
    said = envelope.msg or "no message"
    if envelope.code == BUSY:
        # HeyGem drops (does not queue) a submit that arrives while it works on another task.
        raise BackendBusy(f"HeyGem is busy with another task and dropped job {code}: {said}")
    raise BackendError(f"HeyGem refused job {code} with {envelope.code} ({meaning}): {said}")


def parse_query_response(body: Any) -> TaskRecord | None:
    """The task record of an ``/easy/query`` answer; None when HeyGem does not know the code."""
    envelope = parse_envelope(body)
    if envelope is None:
        raise BackendError(f"HeyGem answered the query with something unexpected: {body!r:.200}")
    if envelope.code == NOT_FOUND:
        return None
    if envelope.code != OK:
        meaning = CODE_MEANINGS.get(envelope.code, "unknown code")
        raise BackendError(f"HeyGem query failed with {envelope.code} ({meaning}): {envelope.msg}")
    data = envelope.data
    return TaskRecord(
        status=_status(data.get("status")),
        progress=_number(data.get("progress")),
        message="" if data.get("msg") is None else str(data.get("msg")),
        result="" if data.get("result") is None else str(data.get("result")),
        raw=dict(data),
    )


def running_percent(heygem_progress: float) -> float:
    # HeyGem's 0 -> 5/10 -> 20 -> 90 -> 100 is already a percentage; 100 belongs to "done".
    return max(0.0, min(99.0, heygem_progress))


def result_candidates(data_dir: Path, container_dir: str, result: str, code: str) -> list[Path]:
    """Host paths where the result of ``code`` may be, most likely first.

    ``result`` is usually ``/{code}-r.mp4`` (relative to ``/code/data/temp``); some images
    give the full container path, and newer ones may write to ``/code/data/result``.
    """
    result = result.strip()
    prefix = container_dir.rstrip("/") + "/"
    relative: list[str] = []
    if result.startswith(prefix):
        relative.append(result[len(prefix) :])
    elif result and "://" not in result:
        name = result.lstrip("/")
        relative += [f"temp/{name}", f"result/{name}", name]
    relative += [f"temp/{code}-r.mp4", f"result/{code}-r.mp4"]
    candidates: list[Path] = []
    for rel in relative:
        path = Path(os.path.normpath(data_dir / rel))
        # A result path that climbs out of the shared folder is not one we will move.
        if path.is_relative_to(data_dir) and path not in candidates:
            candidates.append(path)
    return candidates


def is_job_file(name: str, code: str) -> bool:
    """Whether a file in HeyGem's folders belongs to ``code`` (ours or its intermediates)."""
    # The separator check keeps job "abc" from deleting job "abcd"'s files.
    return name == code or (name.startswith(code) and name[len(code)] in "-_.")


def _status(value: Any) -> TaskStatus:
    try:
        return TaskStatus(int(value))
    except (TypeError, ValueError):
        # Anything that is not terminal is still in progress as far as we can act on it.
        return TaskStatus.RUNNING


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- the backend --------------------------------------------------------------------------


class HeyGemBackend(Backend):
    name = "heygem"

    def __init__(
        self,
        settings: NodeSettings,
        client: httpx.AsyncClient | None = None,
        sleep: SleepFn = asyncio.sleep,
    ) -> None:
        self._base_url = settings.heygem_url.rstrip("/")
        self._data_dir = settings.heygem_data_dir
        self._container_dir = settings.heygem_container_dir
        self._interval_s = settings.heygem_poll_interval_s
        self._sleep = sleep
        self._owns_client = client is None
        # Codes of cancelled jobs the container may still be working on.
        self._abandoned: list[str] = []
        # trust_env=False: the container sits next to the agent; a proxy set for the
        # internet must not capture requests to it.
        self._client = client or httpx.AsyncClient(
            timeout=settings.heygem_request_timeout_s, trust_env=False
        )

    async def run(self, spec: JobSpec, progress: ProgressFn) -> None:
        code = spec.job_id
        if not _SAFE_CODE.fullmatch(code):
            raise BackendError(f"job id {code!r} cannot be used as a HeyGem code")
        staged: list[Path] = []
        submitted = False
        try:
            progress(0.0, "HeyGem: staging inputs")
            payload = await asyncio.to_thread(self._stage_inputs, spec, staged)
            progress(0.0, "HeyGem: submitting")
            submitted = True  # from here on the container may be working on it
            # So that an agent restarted after a crash knows the container may be busy.
            spec.workdir.mkdir(parents=True, exist_ok=True)
            (spec.workdir / SUBMITTED_MARK).write_text(code)
            confirmed = await self._submit(payload, code)
            record = await self._follow(code, progress, confirmed)
            await asyncio.to_thread(self._collect_result, spec, record)
            progress(100.0, "HeyGem: done")
        except asyncio.CancelledError:
            # HeyGem has no cancel API: the container goes on (or hangs on) with the task
            # and drops every other submit meanwhile. probe() watches it until it ends.
            if submitted:
                self._abandoned.append(code)
            raise
        finally:
            # Synchronous on purpose: an await here could be cancelled again.
            self._clean_up(code, staged)

    async def probe(self) -> BackendHealth:
        if not self._data_dir.is_dir():
            return BackendHealth(ok=False, detail=self._missing_data_dir())
        url = f"{self._base_url}/easy/query"
        try:
            response = await self._client.get(url, params={"code": f"probe-{uuid.uuid4().hex}"})
        except httpx.TransportError as exc:
            return BackendHealth(
                ok=False,
                detail=f"HeyGem container at {self._base_url} not answering: {_describe(exc)}",
            )
        envelope = _decode(response)
        if envelope is None:
            return BackendHealth(ok=False, detail=_not_an_envelope(response))
        if envelope.code != NOT_FOUND:
            return BackendHealth(
                ok=False,
                detail=f"HeyGem at {self._base_url} answered a query for an unknown task with "
                f"{envelope.code} ({envelope.msg or 'no message'}) instead of 10004",
            )
        still_busy = await self._abandoned_still_running()
        if still_busy is not None:
            return BackendHealth(ok=False, detail=still_busy)
        return BackendHealth(ok=True, detail=f"HeyGem at {self._base_url} answering")

    def adopt_leftover(self, job_id: str, workdir: Path) -> None:
        # The container outlives the agent: a job submitted before the crash may still
        # run there. Watch it like a cancelled one, so the node says why it is not ready.
        if (workdir / SUBMITTED_MARK).is_file() and job_id not in self._abandoned:
            self._abandoned.append(job_id)

    async def _abandoned_still_running(self) -> str | None:
        """Why the container cannot take work while a cancelled job runs on, if it does."""
        for code in list(self._abandoned):
            try:
                response = await self._client.get(
                    f"{self._base_url}/easy/query", params={"code": code}
                )
                record = parse_query_response(_json(response))
            except (httpx.TransportError, BackendError) as exc:
                return f"cannot tell whether HeyGem still runs cancelled job {code}: {exc}"
            if record is not None and record.status is TaskStatus.RUNNING:
                return (
                    f"HeyGem is still running cancelled job {code} "
                    f"({running_percent(record.progress):.0f} %) and has no cancel API; "
                    "restart the container if it stays stuck"
                )
            # Gone or finished (this query consumed its record): take back its files.
            self._abandoned.remove(code)
            self._clean_up(code, [])
        return None

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    # --- files ----------------------------------------------------------------------------

    def _stage_inputs(self, spec: JobSpec, staged: list[Path]) -> dict[str, Any]:
        if not self._data_dir.is_dir():
            raise BackendError(self._missing_data_dir())
        temp = self._data_dir / "temp"
        temp.mkdir(exist_ok=True)
        # Newer images write results here and fail when it is missing.
        (self._data_dir / "result").mkdir(exist_ok=True)
        token = secrets.token_hex(3)
        names: dict[str, str] = {}
        for kind, source in (("audio", spec.audio), ("video", spec.video)):
            name = f"{spec.job_id}-{token}-{kind}{source.suffix.lower()}"
            staged.append(temp / name)
            _link_or_copy(source, temp / name)
            names[kind] = name
        return submit_payload(
            spec.job_id, names["audio"], names["video"], self._container_dir, spec.options
        )

    def _collect_result(self, spec: JobSpec, record: TaskRecord) -> None:
        candidates = result_candidates(
            self._data_dir, self._container_dir, record.result, spec.job_id
        )
        source = next((path for path in candidates if path.is_file()), None)
        if source is None:
            raise BackendError(
                f"HeyGem reported success but its result {record.result!r} is not in "
                f"{self._data_dir}: is heygem_data_dir the folder mounted at "
                f"{self._container_dir}?"
            )
        if source.stat().st_size == 0:
            raise BackendError(f"HeyGem reported success but its result {source} is empty")
        spec.output.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.move(source, spec.output)
        except OSError as exc:
            raise BackendError(f"cannot move HeyGem's result {source}: {exc}") from exc
        spec.workdir.mkdir(parents=True, exist_ok=True)
        (spec.workdir / RESULT_FILE).write_text(json.dumps(dict(record.raw), ensure_ascii=False))

    def _clean_up(self, code: str, staged: list[Path]) -> None:
        leftovers = list(staged)
        for folder in (self._data_dir / "temp", self._data_dir / "result"):
            if folder.is_dir():
                leftovers += [p for p in folder.iterdir() if is_job_file(p.name, code)]
        for path in leftovers:
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            except OSError as exc:
                # Files the container wrote as root may not be ours to delete; say so, go on.
                log.warning("heygem.cleanup_failed", path=str(path), error=str(exc))

    def _missing_data_dir(self) -> str:
        return (
            f"heygem_data_dir {self._data_dir} does not exist: it must be the host folder "
            f"mounted at {self._container_dir} in the HeyGem container"
        )

    # --- HTTP -----------------------------------------------------------------------------

    async def _submit(self, payload: dict[str, Any], code: str) -> bool:
        """Submit; False when HeyGem may have taken the job but its answer got lost."""
        url = f"{self._base_url}/easy/submit"
        # Only retry errors where the request surely never arrived: re-sending a submit
        # that did arrive would be answered "busy" by our own task.
        retry_on = (httpx.ConnectError, httpx.ConnectTimeout)
        try:
            response = await self._request("POST", url, retry_on, json=payload)
        except httpx.TransportError as exc:
            if isinstance(exc, retry_on):
                raise self._not_answering(exc) from exc
            log.warning("heygem.submit_unconfirmed", code=code, error=_describe(exc))
            return False
        envelope = parse_envelope(_json(response))
        if envelope is None:
            raise BackendError(_not_an_envelope(response))
        check_submit_response(envelope, code)
        log.info("heygem.submitted", code=code)
        return True

    async def _follow(self, code: str, progress: ProgressFn, confirmed: bool) -> TaskRecord:
        """Poll until the task ends; return its one and only terminal record."""
        last_report: tuple[float, str] | None = None
        while True:
            await self._sleep(self._interval_s)
            record = await self._query(code, confirmed)
            confirmed = True
            if record.status is TaskStatus.FAILED:
                raise BackendError(f"HeyGem failed: {record.message or 'no reason given'}")
            if record.status is TaskStatus.SUCCEEDED:
                return record
            percent = running_percent(record.progress)
            report = (percent, f"HeyGem: {record.message or 'synthesizing'}")
            if report != last_report:
                progress(*report)
                last_report = report

    async def _query(self, code: str, confirmed: bool) -> TaskRecord:
        url = f"{self._base_url}/easy/query"
        try:
            response = await self._request(
                "GET", url, (httpx.TransportError,), params={"code": code}
            )
        except httpx.TransportError as exc:
            raise self._not_answering(exc) from exc
        record = parse_query_response(_json(response))
        if record is None:
            raise self._lost(code, confirmed)
        return record

    async def _request(
        self,
        method: str,
        url: str,
        retry_on: tuple[type[httpx.TransportError], ...],
        **kwargs: Any,
    ) -> httpx.Response:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(REQUEST_ATTEMPTS),
            wait=wait_exponential(multiplier=1, max=8),
            retry=retry_if_exception_type(retry_on),
            sleep=self._sleep,
            reraise=True,
            before_sleep=lambda state: log.warning(
                "heygem.retrying", url=url, attempt=state.attempt_number
            ),
        )
        async for attempt in retrying:
            with attempt:
                return await self._client.request(method, url, **kwargs)
        raise AssertionError("unreachable: reraise=True")  # pragma: no cover

    def _not_answering(self, exc: httpx.TransportError) -> BackendError:
        return BackendError(
            f"HeyGem container at {self._base_url} is not answering "
            f"({_describe(exc)}); is it running?"
        )

    @staticmethod
    def _lost(code: str, confirmed: bool) -> BackendError:
        if not confirmed:
            return BackendError(
                f"HeyGem did not answer the submit of {code} and does not know the task: "
                "it never started"
            )
        return BackendError(
            f"HeyGem lost the job: it answers 'task not found' (10004) for code {code} "
            "— the container probably restarted"
        )


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:  # not JSON: a proxy's error page, another service on the port
        raise BackendError(_not_an_envelope(response)) from None


def _decode(response: httpx.Response) -> Envelope | None:
    try:
        return parse_envelope(response.json())
    except ValueError:
        return None


def _not_an_envelope(response: httpx.Response) -> str:
    return (
        f"{response.request.url} answered HTTP {response.status_code} with something that is "
        f"not HeyGem's JSON envelope: {response.text[:200]!r}"
    )


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        # A hard link costs nothing for a multi-GB video when both are on one filesystem.
        os.link(source, target)
    except OSError:  # EXDEV across filesystems, EPERM on some mounts
        shutil.copyfile(source, target)
