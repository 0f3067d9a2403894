"""Uploads spooled to memory up to a threshold, then to a temporary file; removed on every path."""

from __future__ import annotations

import io
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import BinaryIO

from aiohttp import BodyPartReader, payload, web

from gateway.errors import GatewayError, InvalidRequestError, PayloadTooLargeError


@dataclass(slots=True)
class Upload:
    """One uploaded file. `file` is a seekable binary file object (memory, then disk)."""

    filename: str
    content_type: str
    file: BinaryIO = field(repr=False)
    size: int = 0

    def rewind(self) -> BinaryIO:
        self.file.seek(0)
        return self.file

    def payload(self) -> payload.Payload:
        """The file from the start as an aiohttp body part for one upstream attempt. aiohttp closes file
        payloads after sending; this one closes only a view, so the spool stays open for the next route,
        and it knows its size, so an in-memory spool is never rolled over to disk to measure it."""
        return _UploadPayload(_Borrowed(self.rewind()), size=self.size, filename=self.filename,
                              content_type=self.content_type)

    async def chunks(self, size: int = 65_536) -> AsyncIterator[bytes]:
        """The file from the start, in chunks (for forwarding upstream without loading it whole)."""
        f = self.rewind()
        while chunk := f.read(size):
            yield chunk

    def close(self) -> None:
        self.file.close()


class _Borrowed(io.IOBase):
    """Reads, seeks and sizes the spooled file; closing it leaves the spooled file open."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        return self._file.read(size)

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()


class _UploadPayload(payload.IOBasePayload):
    def __init__(self, value: _Borrowed, *, size: int, filename: str, content_type: str) -> None:
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


async def read_form(request: web.Request, *, max_bytes: int, memory_bytes: int,
                    spool_dir: str | None = None) -> Form:
    """Read a multipart/form-data body part by part, spooling the `file` part.

    The size limit is checked from Content-Length before reading, and again while reading (for
    chunked bodies). On any failure, including cancellation, the spooled file is closed (and so
    removed) before the error propagates.
    """
    if request.content_length is not None and request.content_length > max_bytes:
        raise _too_large(max_bytes, request.content_length)
    if request.content_type != "multipart/form-data":
        raise InvalidRequestError(
            f"Invalid Content-Type header ({request.content_type or 'none'}), expected multipart/form-data.",
            code="invalid_content_type")
    form = Form()
    total = 0
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise InvalidRequestError("Nested multipart bodies are not supported.")
            name = part.name or ""
            if part.filename is not None or name == "file":
                if form.upload is not None:
                    raise InvalidRequestError("Only one file may be uploaded.", param="file")
                form.upload = Upload(part.filename or "upload",
                                     part.headers.get("Content-Type", "application/octet-stream"),
                                     spooled_file(memory_bytes, spool_dir))
                while chunk := await part.read_chunk(65_536):
                    total += len(chunk)
                    if total > max_bytes:
                        raise _too_large(max_bytes, total)
                    form.upload.file.write(chunk)
                    form.upload.size += len(chunk)
            else:
                value = await part.read(decode=False)
                total += len(value)
                if total > max_bytes:
                    raise _too_large(max_bytes, total)
                if len(value) > MAX_FIELD_BYTES:
                    raise InvalidRequestError(f"Field '{name}' is too long.", param=name)
                form.fields.append((name, value.decode("utf-8", errors="replace")))
    except GatewayError:
        form.close()
        raise
    except (ValueError, AssertionError, UnicodeDecodeError, RuntimeError):
        form.close()
        raise InvalidRequestError("The multipart/form-data body could not be parsed.",
                                  code="invalid_multipart") from None
    except BaseException:
        form.close()
        raise
    return form


def _too_large(limit: int, seen: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"Maximum content size limit ({limit}) exceeded ({seen} bytes read).")
