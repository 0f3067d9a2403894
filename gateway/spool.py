"""Uploads spooled to memory up to a threshold, then to a temporary file; removed on every path."""

from __future__ import annotations

import io
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from typing import BinaryIO

from aiohttp import BodyPartReader, MultipartReader, payload, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import BadContentDispositionHeader, BadContentDispositionParam

from gateway.audio.workers import AudioWorkers
from gateway.body import check_length, receiving, too_large
from gateway.config import Server
from gateway.errors import GatewayError, InvalidRequestError


@dataclass(slots=True)
class Upload:
    """One uploaded file. `file` is a seekable binary file object (memory, then disk), written only
    while the form is read; every reader after that gets a `view()` with a position of its own."""

    filename: str
    content_type: str
    file: BinaryIO = field(repr=False)
    workers: AudioWorkers = field(repr=False)
    """Where the spool's disk I/O runs, and the decoders that read it."""
    size: int = 0
    memory_bytes: int = 0
    """Past this size the spool is a file on disk: writes go through `workers`."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    async def write(self, chunk: bytes) -> None:
        """Append `chunk`; once the spool is on disk (or this write rolls it over, copying what was in
        memory) on a worker, finished even if the caller is cancelled, so closing never races it."""
        rolls = self.size + len(chunk) > self.memory_bytes
        self.size += len(chunk)
        if rolls:
            await self.workers.finish(self._write, chunk)
        else:
            self._write(chunk)

    def _write(self, chunk: bytes) -> None:
        with self._lock:
            self.file.write(chunk)

    def view(self) -> BinaryIO:
        """The file from the start, with a position of its own: one per failover attempt or decoder,
        so an earlier attempt's read still in flight in some thread cannot move a later one's."""
        return _View(self)  # type: ignore[return-value]

    def payload(self) -> payload.Payload:
        """The file from the start as an aiohttp body part for one upstream attempt. aiohttp closes file
        payloads after sending; this one closes only a view, so the spool stays open for the next route,
        and it knows its size, so an in-memory spool is never rolled over to disk to measure it."""
        return _UploadPayload(_View(self), size=self.size, filename=self.filename,
                              content_type=self.content_type)

    def close(self) -> None:
        with self._lock:
            self.file.close()


class _View(io.RawIOBase):
    """Reads, seeks and sizes the spooled file from a position of its own (each read seeks the shared
    file under the upload's lock); closing it leaves the spooled file open."""

    def __init__(self, upload: Upload) -> None:
        self._upload = upload
        self._pos = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        with self._upload._lock:
            file = self._upload.file
            file.seek(self._pos)
            data = file.read(size)
        self._pos += len(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._upload.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


class _UploadPayload(payload.IOBasePayload):
    def __init__(self, value: _View, *, size: int, filename: str, content_type: str) -> None:
        super().__init__(value, filename=filename, content_type=content_type)
        self._known_size = size

    @property
    def size(self) -> int:
        return self._known_size


def spooled_file(memory_bytes: int, directory: str | None = None) -> BinaryIO:
    return tempfile.SpooledTemporaryFile(max_size=memory_bytes, dir=directory, prefix="gateway-upload-")  # type: ignore[return-value]


@dataclass(slots=True)
class Form:
    """A multipart body: its text fields in order (names as sent) and at most one spooled file."""

    fields: list[tuple[str, str]] = field(default_factory=list)
    upload: Upload | None = None

    def close(self) -> None:
        if self.upload is not None:
            self.upload.close()


MAX_FIELD_BYTES = 65_536
MAX_PART_HEADER_LINES = 32
"""Header lines in one part: a form-data part needs Content-Disposition and maybe Content-Type."""


async def read_form(request: web.Request, limits: Server, workers: AudioWorkers) -> Form:
    """Read a multipart/form-data body part by part, spooling the `file` part.

    The size limit is checked from Content-Length before reading, and against the bytes received
    while reading (for chunked bodies). The part count is checked as each part starts and each
    part's headers are capped, so a hostile form costs at most `max_form_parts` small parses before
    its 400. Every parse failure is a 400 `invalid_multipart`. On any failure, including
    cancellation, the spooled file is closed (and so removed) before the error propagates.
    """
    check_length(request, limits.max_upload_bytes)
    if request.content_type != "multipart/form-data":
        raise InvalidRequestError(
            f"Invalid Content-Type header ({request.content_type or 'none'}), expected multipart/form-data.",
            code="invalid_content_type")
    _quiet_disposition_warnings()
    form = Form()
    try:
        async with receiving(request, limits.max_upload_bytes):
            reader = MultipartReader(request.headers, request.content, max_field_size=limits.max_part_header_bytes,
                                     max_headers=MAX_PART_HEADER_LINES)
            parts = 0
            while (part := await reader.next()) is not None:
                parts += 1
                if parts > limits.max_form_parts:
                    raise _invalid(f"The form has more than {limits.max_form_parts} parts.")
                if not isinstance(part, BodyPartReader):
                    raise _invalid("Nested multipart bodies are not supported.")
                await _read_part(request, part, form, limits, workers)
    except GatewayError:
        form.close()
        raise
    except (ValueError, AssertionError, UnicodeDecodeError, RuntimeError, HttpProcessingError):
        form.close()
        raise _invalid("The multipart/form-data body could not be parsed.") from None
    except BaseException:
        form.close()
        raise
    return form


async def _read_part(request: web.Request, part: BodyPartReader, form: Form, limits: Server,
                     workers: AudioWorkers) -> None:
    with warnings.catch_warnings(record=True) as caught:  # synchronous: no other task runs meanwhile
        warnings.simplefilter("always")
        name, filename = part.name or "", part.filename
    if any(issubclass(w.category, (BadContentDispositionHeader, BadContentDispositionParam)) for w in caught):
        # aiohttp drops a malformed Content-Disposition or name*= parameter with a warning quoting it
        raise _invalid("A part's Content-Disposition header could not be parsed.")
    name, filename = _printable(name, None) or "", _printable(filename, "file")
    if filename is not None or name == "file":
        if form.upload is not None:
            raise InvalidRequestError("Only one file may be uploaded.", param="file")
        form.upload = Upload(filename or "upload", part.headers.get("Content-Type", "application/octet-stream"),
                             spooled_file(limits.spool_memory_bytes, limits.spool_dir), workers,
                             memory_bytes=limits.spool_memory_bytes)
        while chunk := await part.read_chunk(65_536):
            _check_received(request, limits.max_upload_bytes, form.upload.size + len(chunk))
            await form.upload.write(chunk)
        return
    value = bytearray()
    while chunk := await part.read_chunk(16_384):
        value += chunk
        _check_received(request, limits.max_upload_bytes, len(value))
        if len(value) > MAX_FIELD_BYTES:
            raise InvalidRequestError(f"Field '{name}' is too long.", param=name)
    form.fields.append((name, value.decode("utf-8", errors="replace")))


def _quiet_disposition_warnings() -> None:
    """aiohttp warns about a malformed Content-Disposition with the client's header text in the
    message; _read_part turns those into a 400, and they must not print client bytes to stderr.
    Checked on every form, because anything may reset the process's filters
    (warnings.catch_warnings, as pytest does around each test)."""
    for category in (BadContentDispositionHeader, BadContentDispositionParam):
        if ("ignore", None, category, None, 0) not in warnings.filters:  # adding resets "once" registries
            warnings.filterwarnings("ignore", category=category)


def _check_received(request: web.Request, limit: int, part_bytes: int) -> None:
    """The whole body so far (part headers and boundaries included) within the upload limit."""
    received = max(request.content.total_bytes, part_bytes)
    if received > limit:
        raise too_large(limit, received)


def _printable(text: str | None, param: str | None) -> str | None:
    """A part name or filename (also from `name*=`/`filename*=`) with no control character or
    undecodable byte, which would otherwise travel on into logs, backends and file names."""
    if text is not None and any(ord(c) < 32 or ord(c) == 127 or 0xD800 <= ord(c) <= 0xDFFF for c in text):
        raise _invalid("A part name or filename contains control characters or invalid UTF-8.", param)
    return text


def _invalid(message: str, param: str | None = None) -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code="invalid_multipart")
