"""The HeyGem backend against a scripted fake of the gen-video API (respx).

The fake answers with the shapes the real container gives, including its quirks: always
HTTP 200, a dropped submit when busy, and a task record deleted after the first query that
reports it finished.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import respx

from node_agent.backends.base import BackendBusy, BackendError, JobSpec
from node_agent.backends.heygem import (
    HeyGemBackend,
    TaskStatus,
    check_submit_response,
    container_path,
    is_job_file,
    option_flag,
    parse_envelope,
    parse_query_response,
    result_candidates,
    running_percent,
    submit_payload,
)
from node_agent.settings import NodeSettings

URL = "http://heygem.test:8383"
CONTAINER_DIR = "/code/data"
JOB = "4f1c2a9e0b7d"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def envelope(code: int, msg: Any = "", data: Mapping[str, Any] | None = None) -> httpx.Response:
    return httpx.Response(
        200, json={"code": code, "success": True, "msg": msg, "data": dict(data or {})}
    )


def running(progress: float, msg: str = "") -> dict[str, Any]:
    return {"status": 1, "progress": progress, "msg": msg, "result": ""}


def succeeded(**extra: Any) -> dict[str, Any]:
    return {"status": 2, "progress": 100, "msg": "", "result": f"/{JOB}-r.mp4", **extra}


def failed(msg: str) -> dict[str, Any]:
    return {"status": 3, "progress": 0, "msg": msg, "result": ""}


class FakeHeyGem:
    """The container's two endpoints over a shared folder, following a script of records.

    Each query pops the next record of the script; a last running record repeats forever
    (the 20 % hang); a terminal record is deleted once answered, like the real service.
    """

    def __init__(self, data_dir: Path, script: list[dict[str, Any]], submit_code: int = 10000):
        self.data_dir = data_dir
        self.script = script
        self.submit_code = submit_code
        self.submits: list[dict[str, Any]] = []
        self.inputs_seen: list[bytes] = []
        self.queries_after_terminal = 0
        self._records: dict[str, list[dict[str, Any]]] = {}
        self._finished: set[str] = set()

    def host_path(self, container: str) -> Path:
        assert container.startswith(CONTAINER_DIR + "/")
        return self.data_dir / container.removeprefix(CONTAINER_DIR + "/")

    def submit(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.submits.append(body)
        if self.submit_code == 10001:
            return envelope(10001, "忙碌中")
        if self.submit_code != 10000:
            return envelope(self.submit_code, "参数错误")
        # The container can only read what is in its volume, at the path it was given.
        self.inputs_seen = [
            self.host_path(body[k]).read_bytes() for k in ("audio_url", "video_url")
        ]
        assert (self.data_dir / "result").is_dir(), "newer images need /code/data/result"
        code = body["code"]
        (self.data_dir / "temp" / f"{code}_format.mp4").write_bytes(b"intermediate")
        self._records[code] = list(self.script)
        return envelope(10000, 10000)  # some images really put a number in msg

    def finish(self, code: str) -> None:
        """The orphaned task finally ends: its next query reports success."""
        self._records[code] = [succeeded()]

    def query(self, request: httpx.Request) -> httpx.Response:
        code = request.url.params["code"]
        steps = self._records.get(code)
        if not steps:
            self.queries_after_terminal += code in self._finished
            return envelope(10004, "任务不存在")
        record = steps.pop(0) if len(steps) > 1 else steps[0]
        if record["status"] in (2, 3):
            del self._records[code]
            self._finished.add(code)
            if record["status"] == 2:
                (self.data_dir / "temp" / f"{code}-r.mp4").write_bytes(b"synthesized video")
        return envelope(10000, "", {"code": code, **record})


class FakeSleep:
    """Records the waits and returns at once, so polling and retries run in milliseconds."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        await asyncio.sleep(0)


class Progress:
    def __init__(self) -> None:
        self.reports: list[tuple[float, str]] = []

    def __call__(self, percent: float, stage: str) -> None:
        self.reports.append((percent, stage))

    @property
    def percents(self) -> list[float]:
        distinct: list[float] = []
        for percent, _ in self.reports:
            if not distinct or distinct[-1] != percent:
                distinct.append(percent)
        return distinct


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "face2face"
    folder.mkdir()
    return folder


@pytest.fixture
def spec(tmp_path: Path) -> JobSpec:
    job = tmp_path / "job"
    job.mkdir()
    (job / "audio.WAV").write_bytes(b"audio bytes")
    (job / "video.mp4").write_bytes(b"video bytes")
    return JobSpec(
        job_id=JOB,
        audio=job / "audio.WAV",
        video=job / "video.mp4",
        output=job / "out" / "result.mp4",
        workdir=job,
    )


@asynccontextmanager
async def heygem(
    data_dir: Path, fake: FakeHeyGem | None = None, sleep: FakeSleep | None = None
) -> AsyncIterator[tuple[HeyGemBackend, respx.MockRouter]]:
    settings = NodeSettings(
        backend="heygem", heygem_url=URL, heygem_data_dir=data_dir, heygem_poll_interval_s=2.0
    )
    router = respx.mock(base_url=URL, assert_all_called=False)
    if fake is not None:
        router.post("/easy/submit", name="submit").mock(side_effect=fake.submit)
        router.get("/easy/query", name="query").mock(side_effect=fake.query)
    router.start()
    try:
        async with httpx.AsyncClient() as client:
            yield HeyGemBackend(settings, client=client, sleep=sleep or FakeSleep()), router
    finally:
        # Keep routes and recorded calls so tests can assert on them after the block.
        router.stop(clear=False, reset=False)


def leftovers(data_dir: Path) -> list[str]:
    return sorted(p.name for folder in ("temp", "result") for p in (data_dir / folder).iterdir())


# --- pure helpers -------------------------------------------------------------------------


def test_container_path() -> None:
    assert container_path("/code/data/", "a-audio.wav") == "/code/data/temp/a-audio.wav"


def test_submit_payload_defaults_and_pass_through() -> None:
    defaults = submit_payload("c1", "a.wav", "v.mp4", CONTAINER_DIR, {})
    assert defaults == {
        "audio_url": "/code/data/temp/a.wav",
        "video_url": "/code/data/temp/v.mp4",
        "code": "c1",
        "watermark_switch": 0,
        "digital_auth": 0,
        "chaofen": 0,
        "pn": 1,
    }
    options = {"chaofen": "1", "watermark_switch": True, "pn": 0, "other": "ignored"}
    chosen = submit_payload("c1", "a.wav", "v.mp4", CONTAINER_DIR, options)
    assert (chosen["chaofen"], chosen["watermark_switch"], chosen["pn"]) == (1, 1, 0)
    assert "other" not in chosen


@pytest.mark.parametrize("value", [2, "yes please", None, 0.5])
def test_option_flag_refuses_what_is_not_zero_or_one(value: Any) -> None:
    with pytest.raises(BackendError, match="must be 0 or 1"):
        option_flag("chaofen", value)


@pytest.mark.parametrize(
    ("code", "error", "text"),
    [
        (10001, BackendBusy, "busy"),
        (10002, BackendError, "10002 (bad parameter): audio_url missing"),
        (10003, BackendError, "10003 (lock error)"),
        (9999, BackendError, "9999 (system error)"),
    ],
)
def test_submit_refusals(code: int, error: type[BackendError], text: str) -> None:
    answer = parse_envelope({"code": code, "success": False, "msg": "audio_url missing"})
    assert answer is not None
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")):
        check_submit_response(answer, "c1")


def test_busy_is_a_backend_busy_and_accepted_is_silent() -> None:
    accepted = parse_envelope({"code": 10000, "success": True, "msg": 10000, "data": {}})
    assert accepted is not None and accepted.msg == "10000"
    check_submit_response(accepted, "c1")


def test_parse_query_response_real_shapes() -> None:
    # As logged from a real container (billwuhao/Comfyui_HeyGem#2).
    body = {
        "code": 10000,
        "data": {
            "code": "f3",
            "msg": "三次获取音频时长失败",
            "progress": 0,
            "result": "",
            "status": 3,
        },
        "msg": "",
        "success": True,
    }
    record = parse_query_response(body)
    assert record is not None
    assert (record.status, record.message) == (TaskStatus.FAILED, "三次获取音频时长失败")
    assert parse_query_response({"code": 10004, "data": {}, "msg": "任务不存在"}) is None
    with pytest.raises(BackendError, match="9999"):
        parse_query_response({"code": 9999, "msg": "boom", "data": {}})
    with pytest.raises(BackendError, match="unexpected"):
        parse_query_response(["not", "an", "envelope"])


@pytest.mark.parametrize(
    ("heygem", "ours"), [(0, 0.0), (5, 5.0), (20, 20.0), (90, 90.0), (100, 99.0), (-3, 0.0)]
)
def test_running_percent(heygem: float, ours: float) -> None:
    assert running_percent(heygem) == ours


@pytest.mark.parametrize(
    ("result", "first"),
    [
        ("/c1-r.mp4", "temp/c1-r.mp4"),
        ("/code/data/temp/c1-r.mp4", "temp/c1-r.mp4"),
        ("/code/data/result/c1-r.mp4", "result/c1-r.mp4"),
        ("", "temp/c1-r.mp4"),
        ("http://host/c1-r.mp4", "temp/c1-r.mp4"),
        ("/../../etc/passwd", "temp/c1-r.mp4"),
    ],
)
def test_result_candidates(tmp_path: Path, result: str, first: str) -> None:
    candidates = result_candidates(tmp_path, CONTAINER_DIR, result, "c1")
    assert candidates[0] == tmp_path / first
    assert tmp_path / "result" / "c1-r.mp4" in candidates
    assert all(path.is_relative_to(tmp_path) for path in candidates)


@pytest.mark.parametrize(
    ("code", "name", "mine"),
    [
        ("c1", "c1-r.mp4", True),
        ("c1", "c1_format.mp4", True),
        ("c1", "c1", True),
        ("c1", "c12-r.mp4", False),
        # The dispatcher's ids are "<task>.<attempt>": attempt 1 must spare attempt 10.
        ("t9.1", "t9.1-r.mp4", True),
        ("t9.1", "t9.10-r.mp4", False),
    ],
)
def test_is_job_file(code: str, name: str, mine: bool) -> None:
    assert is_job_file(name, code) is mine


# --- runs ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_normal_run(data_dir: Path, spec: JobSpec) -> None:
    script = [
        running(0),
        running(5, "处理中"),
        running(20),
        running(20),
        running(90),
        succeeded(cost=41.5, video_duration=3000, width=1080, height=1920),
    ]
    fake, progress, sleep = FakeHeyGem(data_dir, script), Progress(), FakeSleep()
    async with heygem(data_dir, fake, sleep) as (backend, router):
        await backend.run(spec, progress)

    assert progress.percents == [0.0, 5.0, 20.0, 90.0, 100.0]
    assert (5.0, "HeyGem: 处理中") in progress.reports
    assert (20.0, "HeyGem: synthesizing") in progress.reports
    assert spec.output.read_bytes() == b"synthesized video"
    assert fake.inputs_seen == [b"audio bytes", b"video bytes"]
    submitted = fake.submits[0]
    assert submitted["code"] == JOB
    assert submitted["audio_url"].startswith(f"/code/data/temp/{JOB}-")
    assert submitted["audio_url"].endswith(".wav")
    assert leftovers(data_dir) == []  # inputs, intermediates and the result are gone
    assert set(sleep.calls) == {2.0}
    kept = json.loads((spec.workdir / "backend_result.json").read_text())
    assert kept["cost"] == 41.5 and kept["width"] == 1080 and kept["status"] == 2


@pytest.mark.anyio
async def test_terminal_record_is_read_exactly_once(data_dir: Path, spec: JobSpec) -> None:
    fake = FakeHeyGem(data_dir, [running(20), succeeded()])
    async with heygem(data_dir, fake) as (backend, router):
        await backend.run(spec, Progress())

    # A second query would have answered 10004 and turned a success into an error.
    assert router["query"].call_count == 2
    assert fake.queries_after_terminal == 0
    assert spec.output.exists()


@pytest.mark.anyio
async def test_busy_submit_is_backend_busy(data_dir: Path, spec: JobSpec) -> None:
    fake = FakeHeyGem(data_dir, [], submit_code=10001)
    async with heygem(data_dir, fake) as (backend, router):
        with pytest.raises(BackendBusy, match="busy"):
            await backend.run(spec, Progress())

    assert router["query"].call_count == 0
    assert leftovers(data_dir) == []


@pytest.mark.anyio
async def test_bad_parameter_submit_is_an_error(data_dir: Path, spec: JobSpec) -> None:
    fake = FakeHeyGem(data_dir, [], submit_code=10002)
    async with heygem(data_dir, fake) as (backend, _):
        with pytest.raises(BackendError, match="10002 \\(bad parameter\\): 参数错误") as caught:
            await backend.run(spec, Progress())
    assert not isinstance(caught.value, BackendBusy)


@pytest.mark.anyio
async def test_failed_status_carries_heygem_message(data_dir: Path, spec: JobSpec) -> None:
    fake = FakeHeyGem(data_dir, [running(5), failed("三次获取音频时长失败")])
    async with heygem(data_dir, fake) as (backend, _):
        with pytest.raises(BackendError, match="HeyGem failed: 三次获取音频时长失败"):
            await backend.run(spec, Progress())

    assert fake.queries_after_terminal == 0
    assert leftovers(data_dir) == []
    assert not spec.output.exists()


@pytest.mark.anyio
async def test_job_lost_mid_run(data_dir: Path, spec: JobSpec) -> None:
    fake = FakeHeyGem(data_dir, [running(5), running(20)])
    async with heygem(data_dir, fake) as (backend, router):
        router["query"].side_effect = [
            envelope(10000, "", {"code": JOB, **running(5)}),
            envelope(10004, "任务不存在"),
        ]
        with pytest.raises(BackendError) as caught:
            await backend.run(spec, Progress())

    assert "HeyGem lost the job" in caught.value.message
    assert f"(10004) for code {JOB}" in caught.value.message
    assert "restarted" in caught.value.message
    assert leftovers(data_dir) == []


@pytest.mark.anyio
async def test_hang_at_20_percent_keeps_polling_until_cancelled(
    data_dir: Path, spec: JobSpec
) -> None:
    fake, progress = FakeHeyGem(data_dir, [running(5), running(20, "queue full")]), Progress()
    sleep = FakeSleep()
    async with heygem(data_dir, fake, sleep) as (backend, router):
        task = asyncio.create_task(backend.run(spec, progress))
        while router["query"].call_count < 50:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        # No timeout of its own: fifty polls at 20 % and still waiting; the cancel ended it.
        assert progress.reports[-1] == (20.0, "HeyGem: queue full")
        assert progress.percents == [0.0, 5.0, 20.0]
        assert leftovers(data_dir) == []
        assert not spec.output.exists()

        # HeyGem cannot cancel: the container is still stuck, and health says so...
        stuck = await backend.probe()
        assert not stuck.ok and f"still running cancelled job {JOB} (20 %)" in stuck.detail

        # ...until the orphaned task ends; then the result it wrote late is removed too.
        fake.finish(JOB)
        assert (await backend.probe()).ok
        assert leftovers(data_dir) == []
        assert fake.queries_after_terminal == 0


@pytest.mark.anyio
async def test_a_job_left_by_a_crashed_agent_keeps_the_node_unready_until_it_ends(
    data_dir: Path, spec: JobSpec
) -> None:
    fake = FakeHeyGem(data_dir, [running(20, "queue full")])
    async with heygem(data_dir, fake, FakeSleep()) as (first, _router):
        task = asyncio.create_task(first.run(spec, Progress()))
        while not fake.submits:
            await asyncio.sleep(0)
        task.cancel()  # stands in for the agent being killed: this backend object is gone
        with pytest.raises(asyncio.CancelledError):
            await task
    async with heygem(data_dir, fake, FakeSleep()) as (restarted, _router):
        assert (await restarted.probe()).ok  # knows nothing yet
        restarted.adopt_leftover(JOB, spec.workdir)  # what the job manager does at start-up
        stuck = await restarted.probe()
        assert not stuck.ok and f"still running cancelled job {JOB} (20 %)" in stuck.detail
        fake.finish(JOB)
        assert (await restarted.probe()).ok


@pytest.mark.anyio
async def test_run_against_a_container_that_refuses_connections(
    data_dir: Path, spec: JobSpec
) -> None:
    sleep = FakeSleep()
    async with heygem(data_dir, sleep=sleep) as (backend, router):
        submit = router.post("/easy/submit").mock(side_effect=httpx.ConnectError("refused"))
        with pytest.raises(BackendError) as caught:
            await backend.run(spec, Progress())

    assert f"HeyGem container at {URL} is not answering" in caught.value.message
    assert submit.call_count == 4  # retried with backoff...
    assert sleep.calls == [1, 2, 4]  # ...through the injected sleep
    assert leftovers(data_dir) == []


@pytest.mark.anyio
async def test_query_survives_a_short_outage(data_dir: Path, spec: JobSpec) -> None:
    fake = FakeHeyGem(data_dir, [running(20), succeeded()])
    async with heygem(data_dir, fake) as (backend, router):
        outage = [httpx.ConnectError("refused"), httpx.ReadTimeout("slow")]

        def flaky(request: httpx.Request) -> httpx.Response:
            if outage:
                raise outage.pop(0)
            return fake.query(request)

        router["query"].side_effect = flaky
        await backend.run(spec, Progress())
    assert spec.output.exists()
    assert router["query"].call_count == 4


@pytest.mark.anyio
async def test_submit_whose_answer_got_lost_is_followed(data_dir: Path, spec: JobSpec) -> None:
    fake = FakeHeyGem(data_dir, [running(20), succeeded()])
    async with heygem(data_dir, fake) as (backend, router):

        def accept_then_time_out(request: httpx.Request) -> httpx.Response:
            fake.submit(request)
            raise httpx.ReadTimeout("the answer never came", request=request)

        router["submit"].side_effect = accept_then_time_out
        await backend.run(spec, Progress())

    assert router["submit"].call_count == 1  # never re-sent: it would be "busy" with itself
    assert spec.output.exists()


@pytest.mark.anyio
async def test_options_pass_through_to_submit(data_dir: Path, tmp_path: Path) -> None:
    base = JobSpec(
        job_id=JOB,
        audio=tmp_path / "a.mp3",
        video=tmp_path / "v.mp4",
        output=tmp_path / "o.mp4",
        workdir=tmp_path,
        options={"chaofen": 1, "watermark_switch": 1, "pn": 0},
    )
    base.audio.write_bytes(b"a")
    base.video.write_bytes(b"v")
    fake = FakeHeyGem(data_dir, [succeeded()])
    async with heygem(data_dir, fake) as (backend, _):
        await backend.run(base, Progress())

    sent = fake.submits[0]
    assert (sent["chaofen"], sent["watermark_switch"], sent["pn"], sent["digital_auth"]) == (
        1,
        1,
        0,
        0,
    )


@pytest.mark.anyio
async def test_success_without_a_result_file_explains_the_volume(
    data_dir: Path, spec: JobSpec
) -> None:
    fake = FakeHeyGem(data_dir, [running(20), succeeded()])
    async with heygem(data_dir, fake) as (backend, router):
        router["query"].side_effect = [
            envelope(10000, "", {"code": JOB, **running(20)}),
            envelope(10000, "", {"code": JOB, **succeeded()}),  # but no file written
        ]
        with pytest.raises(BackendError, match="mounted at /code/data"):
            await backend.run(spec, Progress())


@pytest.mark.anyio
async def test_missing_data_dir_is_reported_before_submitting(
    tmp_path: Path, spec: JobSpec
) -> None:
    fake = FakeHeyGem(tmp_path / "nowhere", [])
    async with heygem(tmp_path / "nowhere", fake) as (backend, router):
        with pytest.raises(BackendError, match="heygem_data_dir .* does not exist"):
            await backend.run(spec, Progress())
        health = await backend.probe()
    assert router["submit"].call_count == 0
    assert not health.ok and "mounted at /code/data" in health.detail


# --- probe --------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_probe_ok_when_an_unknown_code_is_not_found(data_dir: Path) -> None:
    async with heygem(data_dir, FakeHeyGem(data_dir, [])) as (backend, router):
        health = await backend.probe()
    assert health.ok
    assert router["query"].calls.last.request.url.params["code"].startswith("probe-")


@pytest.mark.anyio
async def test_probe_refused_connection(data_dir: Path) -> None:
    async with heygem(data_dir) as (backend, router):
        router.get("/easy/query").mock(side_effect=httpx.ConnectError("Connection refused"))
        health = await backend.probe()
    assert not health.ok
    assert (
        health.detail
        == f"HeyGem container at {URL} not answering: ConnectError: Connection refused"
    )


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("answer", "said"),
    [
        (envelope(9999, "系统错误"), "9999 (系统错误)"),
        (httpx.Response(502, text="<html>Bad Gateway</html>"), "HTTP 502"),
    ],
)
async def test_probe_reports_any_other_answer(
    data_dir: Path, answer: httpx.Response, said: str
) -> None:
    async with heygem(data_dir) as (backend, router):
        router.get("/easy/query").mock(return_value=answer)
        health = await backend.probe()
    assert not health.ok and said in health.detail
