"""An upload, held in memory or in an unnamed temporary file, and sent on to a backend from there.

Memory is bounded twice: one upload keeps at most `server.spool_memory_bytes` in memory, and at most
`server.spool_memory_uploads` uploads are in memory at once (`SpoolMemory`); an upload that finds
every slot taken goes to disk from its first byte, and one that grows past the size moves there
(copying what it held once). So the spools of a process hold at most the product of the two in
memory, whatever the traffic. Writes to disk run on the audio workers, never on the event loop.

Readers never share a file position: a decoder or a failover attempt gets a `view()`, and a
backend gets `payload()`, which sends the bytes without copying them when they are in memory and
reads them from disk on the audio workers otherwise. A payload holds its last bytes back until the
upload's measurement passed (`measurement`), so a backend never receives a complete request for an
upload the gateway refuses (see handlers/transcribe.py). The file is closed, and so gone, on every
path (`close`).
"""

from __future__ import annotations

import asyncio
import io
import os
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from aiohttp import payload
from aiohttp.abc import AbstractStreamWriter

from gateway.audio.workers import AudioWorkers

SPOOL_PREFIX = "gateway-upload-"
SEND_BYTES = 262_144
"""A payload sends (and, from disk, reads) this much at a time (measured: larger gains nothing)."""


class SpoolMemory:
    """How many uploads may be held in memory at once (`server.spool_memory_uploads`)."""

    def __init__(self, uploads: int) -> None:
        self.uploads = uploads
        self.held = 0

    def take(self) -> bool:
        if self.held >= self.uploads:
            return False
        self.held += 1
        return True

    def give(self) -> None:
        self.held -= 1


@dataclass(slots=True, eq=False)
class Upload:
    """One uploaded file, written only while the form is read."""

    filename: str
    content_type: str
    workers: AudioWorkers = field(repr=False)
    """Where the spool's disk I/O runs, and the decoders that read it."""
    memory: SpoolMemory | None = field(default=None, repr=False)
    """The budget whose slot this upload holds while it is in memory (None: disk from the first byte)."""
    memory_bytes: int = 0
    """Past this size the upload moves to disk."""
    directory: str | None = None
    size: int = 0
    measurement: asyncio.Future[float] | None = field(default=None, repr=False)
    """The upload's duration being established (the handler's); payloads wait for it before their last bytes."""
    _buffer: bytearray | None = field(default=None, repr=False)
    _file: BinaryIO | None = field(default=None, repr=False)
    _closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.memory is not None and self.memory_bytes > 0 and self.memory.take():
            self._buffer = bytearray()
        else:
            self.memory = None

    @classmethod
    def of(cls, filename: str, content_type: str, data: bytes, workers: AudioWorkers) -> Upload:
        """An upload already in memory (the embedded engines' tests and benchmarks)."""
        upload = cls(filename, content_type, workers, SpoolMemory(1), len(data))
        upload._buffer, upload.size = bytearray(data), len(data)
        return upload

    @property
    def in_memory(self) -> bool:
        return self._buffer is not None

    async def write(self, chunk: bytes) -> None:
        """Append `chunk`: to memory while it fits, else to disk on a worker (finished even if the caller is
        cancelled, so closing never races it). Moving to disk copies what memory held, once."""
        self.size += len(chunk)
        buffer = self._buffer
        if buffer is not None and self.size <= self.memory_bytes:
            buffer += chunk
            return
        if buffer is not None:  # past the size: to disk, and the memory slot given back
            self._buffer = None
            self._give_memory()
            await self.workers.finish(self._write_disk, buffer, chunk)
        else:
            await self.workers.finish(self._write_disk, chunk)

    def _write_disk(self, *chunks: bytes | bytearray) -> None:
        with self._lock:
            if self._closed:
                return
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix=SPOOL_PREFIX, dir=self.directory, buffering=0)  # type: ignore[assignment]
            fd = self._file.fileno()  # type: ignore[union-attr]
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]

    def read_at(self, offset: int, size: int) -> bytes:
        """Up to `size` bytes from `offset` (b"" past the end); safe from any thread."""
        size = max(0, min(size, self.size - offset))
        buffer = self._buffer
        if buffer is not None:
            with memoryview(buffer) as whole:
                return bytes(whole[offset:offset + size])  # one copy (a bytearray slice would be two)
        with self._lock:
            if self._closed:
                raise ValueError("read from a closed upload")
            return os.pread(self._file.fileno(), size, offset) if self._file is not None and size else b""

    def view(self) -> BinaryIO:
        """The file from the start, with a position of its own: one per failover attempt or decoder,
        so an earlier attempt's read still in flight in some thread cannot move a later one's."""
        return _View(self)  # type: ignore[return-value]

    def payload(self) -> payload.Payload:
        """The file as an aiohttp body part for one upstream attempt (see the module docstring)."""
        return _UploadPayload(self, filename=self.filename, content_type=self.content_type)

    async def measured(self) -> float | None:
        """The upload's seconds once measured (raising the measurement's 400); None if nobody measures it."""
        if self.measurement is None:
            return None
        await asyncio.wait([self.measurement])  # not cancelled by a cancelled waiter: others wait for it too
        return self.measurement.result()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._file is not None:
                self._file.close()
        self._buffer = None
        self._give_memory()

    def _give_memory(self) -> None:
        if self.memory is not None:
            self.memory.give()
            self.memory = None


class _View(io.RawIOBase):
    """Reads, seeks and sizes the upload from a position of its own; closing it leaves the upload open."""

    def __init__(self, upload: Upload) -> None:
        self._upload = upload
        self._pos = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._upload.read_at(self._pos, self._upload.size if size < 0 else size)
        self._pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
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


class _UploadPayload(payload.Payload):
    """The upload as a request body (part): memory sent as slices of itself, disk read on the workers, and
    the last slice sent only once the upload's measurement passed. Its size is known, so aiohttp sends a
    Content-Length and never reads the file to find it."""

    def __init__(self, upload: Upload, **kwargs: Any) -> None:
        super().__init__(upload, **kwargs)
        self._upload = upload
        self._size = upload.size

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("an upload is not text")

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        upload = self._upload
        end = upload.size if content_length is None else min(upload.size, content_length)
        buffer = upload._buffer
        whole = memoryview(buffer) if buffer is not None else None
        try:
            if not end:
                await upload.measured()  # nothing to hold back: the request ends only once it passed
            offset = 0
            while offset < end:
                size = min(SEND_BYTES, end - offset)
                if offset + size >= end:
                    await upload.measured()  # the last bytes: only for an upload that passed
                if whole is not None:
                    chunk: bytes | memoryview = whole[offset:offset + size]
                else:
                    chunk = await upload.workers.finish(upload.read_at, offset, size)
                await writer.write(chunk)
                offset += size
        finally:
            if whole is not None:
                whole.release()  # a slice still queued in the transport keeps its own reference
