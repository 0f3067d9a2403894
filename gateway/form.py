"""Reading a multipart/form-data body once, part by part: its text fields, and its file into a spool
(gateway/spool.py), within the form's limits."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from aiohttp import BodyPartReader, MultipartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import BadContentDispositionHeader, BadContentDispositionParam

from gateway.audio.workers import AudioWorkers
from gateway.body import check_length, receiving, too_large
from gateway.errors import GatewayError, InvalidRequestError
from gateway.settings import Server
from gateway.spool import SpoolMemory, Upload


@dataclass(slots=True)
class Form:
    """A multipart body: its text fields in order (names as sent) and at most one spooled file."""

    fields: list[tuple[str, str]] = field(default_factory=list)
    upload: Upload | None = None

    def close(self) -> None:
        if self.upload is not None:
            self.upload.close()


READ_BYTES = 65_536
"""The file part is read this much at a time. Measured on a 1.2 MB form: aiohttp's part reader joins and
rescans what is buffered, so 128 KiB reads cost 1.3-1.8 times the CPU of 64 KiB and 256 KiB 1.6-2.6 times;
32 KiB is no cheaper."""
MAX_FIELD_BYTES = 65_536
MAX_PART_HEADER_LINES = 32
"""Header lines in one part: a form-data part needs Content-Disposition and maybe Content-Type."""


async def read_form(request: web.Request, limits: Server, workers: AudioWorkers, memory: SpoolMemory) -> Form:
    """Read a multipart/form-data body part by part, spooling the `file` part.

    The size limit is checked from Content-Length before reading, and against the bytes received
    while reading (for chunked bodies). The part count is checked as each part starts and each
    part's headers are capped, so a hostile form costs at most `max_form_parts` small parses before
    its 400. Every parse failure is a 400 `invalid_multipart`. On any failure, including
    cancellation, the spooled file is closed (and so removed) before the error propagates.
    """
    check_length(request, limits.max_upload_bytes)
    mimetype = _mimetype(request)
    if mimetype != "multipart/form-data":
        raise InvalidRequestError(
            f"Invalid Content-Type header ({mimetype or 'none'}), expected multipart/form-data.",
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
                await _read_part(request, part, form, limits, workers, memory)
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
                     workers: AudioWorkers, memory: SpoolMemory) -> None:
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
        ctype = part.headers.get("Content-Type", "application/octet-stream")
        form.upload = upload = Upload(filename or "upload", ctype, workers, memory, limits.spool_memory_bytes,
                                      limits.spool_dir)
        while chunk := await part.read_chunk(READ_BYTES):
            _check_received(request, limits.max_upload_bytes, upload.size + len(chunk))
            await upload.write(chunk)
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


def _mimetype(request: web.Request) -> str:
    """The Content-Type's media type. `request.content_type` parses the header with the email package,
    about 6% of a 1 MiB upload's CPU; the boundary is MultipartReader's to parse."""
    return request.headers.get(hdrs.CONTENT_TYPE, "").partition(";")[0].strip().lower()


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
