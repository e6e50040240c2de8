"""Streaming multipart/form-data straight to disk.

Starlette's ``request.form()`` spools each file to a temporary file and leaves us to copy it
again; a video can be gigabytes. Here every file part is written once, chunk by chunk, into
the folder that will keep it, and the upload is refused the moment it passes the size limit.
Memory stays flat whatever the upload size.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

MAX_TEXT_FIELD_BYTES = 64 * 1024


class FormError(Exception):
    """The request body is not a form we can take; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class UploadedFile:
    field: str
    filename: str
    content_type: str
    path: Path
    size: int = 0


@dataclass
class SpooledForm:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, UploadedFile] = field(default_factory=dict)

    def first_file(self, *names: str) -> UploadedFile | None:
        return next((self.files[n] for n in names if n in self.files), None)

    def first_field(self, *names: str) -> str | None:
        return next((self.fields[n] for n in names if n in self.fields), None)


_SAFE_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,8}$")


def json_object_field(form: SpooledForm, name: str) -> dict[str, Any]:
    """A form field holding a JSON object (absent or empty: an empty one)."""
    raw = form.fields.get(name, "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise FormError(400, f"{name} must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise FormError(400, f"{name} must be a JSON object")
    return value


def safe_suffix(filename: str) -> str:
    """The file's extension if it is harmless, else none (the name itself is never used)."""
    suffix = Path(filename).suffix.lower()
    return suffix if _SAFE_SUFFIX.match(suffix) else ""


class _PartSink:
    """Collects the parser's callbacks for the part being read."""

    def __init__(self, dest_dir: Path, file_fields: frozenset[str]) -> None:
        self.dest_dir = dest_dir
        self.file_fields = file_fields
        self.form = SpooledForm()
        self._headers: dict[bytes, bytes] = {}
        self._header_field = b""
        self._header_value = b""
        self._name = ""
        self._text = bytearray()
        self._file: UploadedFile | None = None
        self._handle: IO[bytes] | None = None

    # -- header callbacks -------------------------------------------------------------
    def on_part_begin(self) -> None:
        self._headers.clear()
        self._text.clear()
        self._file = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" not in params:
            return
        if self._name not in self.file_fields:
            raise FormError(400, f"unexpected file field '{self._name}'")
        if self._name in self.form.files:
            raise FormError(400, f"file field '{self._name}' was sent twice")
        filename = params[b"filename"].decode("utf-8", "replace")
        path = self.dest_dir / f"{self._name}{safe_suffix(filename)}"
        content_type = self._headers.get(b"content-type", b"").decode("latin-1")
        self._file = UploadedFile(self._name, filename, content_type, path)
        self._handle = path.open("wb")

    # -- body callbacks ---------------------------------------------------------------
    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None and self._handle is not None:
            self._handle.write(data[start:end])
            self._file.size += end - start
            return
        self._text += data[start:end]
        if len(self._text) > MAX_TEXT_FIELD_BYTES:
            raise FormError(413, f"form field '{self._name}' is longer than 64 KiB")

    def on_part_end(self) -> None:
        if self._file is not None and self._handle is not None:
            # On disk before the task that points at it is stored: a power cut after the
            # submit was answered must not leave a task with a half-written input.
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None
            self.form.files[self._file.field] = self._file
            return
        self.form.fields[self._name] = self._text.decode("utf-8", "replace")

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


async def spool_form(
    content_type: str,
    body: AsyncIterator[bytes],
    dest_dir: Path,
    *,
    file_fields: frozenset[str],
    max_bytes: int,
) -> SpooledForm:
    """Parse a multipart body, writing the named file fields into ``dest_dir``.

    Raises FormError; the caller removes ``dest_dir`` on any error.
    """
    mime, params = parse_options_header(content_type)
    if mime != b"multipart/form-data" or b"boundary" not in params:
        raise FormError(415, "send the files as multipart/form-data")
    sink = _PartSink(dest_dir, file_fields)
    callbacks = {
        name: getattr(sink, name)
        for name in (
            "on_part_begin",
            "on_header_field",
            "on_header_value",
            "on_header_end",
            "on_headers_finished",
            "on_part_data",
            "on_part_end",
        )
    }
    parser = MultipartParser(params[b"boundary"], callbacks)  # type: ignore[arg-type]
    received = 0
    try:
        async for chunk in body:
            received += len(chunk)
            if received > max_bytes:
                raise FormError(413, f"upload is larger than the limit of {max_bytes} bytes")
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise FormError(400, f"the multipart body is malformed: {exc}") from exc
    finally:
        sink.close()
    return sink.form
