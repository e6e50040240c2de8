"""Streaming multipart parsing straight to disk."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from heygem_common.forms import FormError, safe_suffix, spool_form

pytestmark = pytest.mark.anyio


def encode(files: dict[str, tuple[str, bytes]], data: dict[str, str]) -> tuple[str, bytes]:
    request = httpx.Request("POST", "http://x", files=files, data=data)
    return request.headers["content-type"], request.read()


async def chunks(body: bytes, size: int = 7) -> AsyncIterator[bytes]:
    for i in range(0, len(body), size):
        yield body[i : i + size]


async def test_files_land_on_disk_and_fields_are_read(tmp_path: Path) -> None:
    payload = bytes(range(256)) * 1000
    ctype, body = encode({"audio": ("../../evil name.MP3", payload)}, {"description": "héllo"})
    form = await spool_form(
        ctype, chunks(body, 4096), tmp_path, file_fields=frozenset({"audio"}), max_bytes=10**7
    )
    upload = form.files["audio"]
    assert upload.path == tmp_path / "audio.mp3"  # the client's name never reaches the disk
    assert upload.path.read_bytes() == payload and upload.size == len(payload)
    assert upload.filename == "../../evil name.MP3"
    assert form.fields == {"description": "héllo"}


async def test_oversize_upload_stops_at_the_limit(tmp_path: Path) -> None:
    ctype, body = encode({"audio": ("a.mp3", b"x" * 10_000)}, {})
    with pytest.raises(FormError) as err:
        await spool_form(
            ctype, chunks(body, 1000), tmp_path, file_fields=frozenset({"audio"}), max_bytes=5_000
        )
    assert err.value.status == 413


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        ("application/json", b"{}", 415),
        ("multipart/form-data", b"", 415),  # no boundary
    ],
)
async def test_not_a_form(tmp_path: Path, content_type: str, body: bytes, status: int) -> None:
    with pytest.raises(FormError) as err:
        await spool_form(
            content_type, chunks(body), tmp_path, file_fields=frozenset({"audio"}), max_bytes=100
        )
    assert err.value.status == status


async def test_unexpected_file_field_is_refused(tmp_path: Path) -> None:
    ctype, body = encode({"payload": ("x.bin", b"123")}, {})
    with pytest.raises(FormError, match="unexpected file field 'payload'"):
        await spool_form(
            ctype, chunks(body), tmp_path, file_fields=frozenset({"audio"}), max_bytes=10**6
        )


@pytest.mark.parametrize(
    ("name", "suffix"),
    [
        ("a.mp4", ".mp4"),
        ("A.MOV", ".mov"),
        ("noext", ""),
        ("x.tar.gz", ".gz"),
        ("x.<script>", ""),
        ("x.verylongextension", ""),
    ],
)
def test_safe_suffix(name: str, suffix: str) -> None:
    assert safe_suffix(name) == suffix
