"""Seconds of speech audio actually delivered to a client, measured from the bytes that went out.

Raw PCM is counted by its length. Encoded audio is kept in a spool (memory, then an unnamed temp
file) as it passes and measured once at the end by demuxing it (packet durations; no decoding) in
a worker thread. For a stream the client abandoned, this is the audio it actually received.
"""

from __future__ import annotations

import asyncio
import base64
import json
import tempfile
from collections.abc import AsyncIterator
from typing import BinaryIO

import av

from gateway.audio.formats import OPENAI_PCM_RATE

_PCM_BYTES_PER_SECOND = OPENAI_PCM_RATE * 2


class AudioMeter:
    def __init__(self, response_format: str, *, sse: bool = False, memory_bytes: int = 1_048_576) -> None:
        self.format = response_format
        self.sse = sse
        self.raw_bytes = 0
        self._pending = b""
        self._spool: BinaryIO | None = None
        if response_format != "pcm":
            self._spool = tempfile.SpooledTemporaryFile(max_size=memory_bytes)  # type: ignore[assignment]

    async def tap(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Pass `chunks` through unchanged, recording them."""
        try:
            async for chunk in chunks:
                self._record_sse(chunk) if self.sse else self._record(chunk)
                yield chunk
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    def _record(self, audio: bytes) -> None:
        self.raw_bytes += len(audio)
        if self._spool is not None:
            self._spool.write(audio)

    def _record_sse(self, chunk: bytes) -> None:
        """OpenAI speech SSE: the audio is base64 in `speech.audio.delta` events."""
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            try:
                event = json.loads(line[5:])
                if event.get("type") == "speech.audio.delta":
                    self._record(base64.b64decode(event.get("audio", "")))
            except (ValueError, AttributeError, TypeError):
                continue

    @property
    def needs_decoding(self) -> bool:
        """Whether `seconds()` has to demux encoded audio (in a worker thread)."""
        return self._spool is not None

    def pcm_seconds(self) -> float:
        return self.raw_bytes / _PCM_BYTES_PER_SECOND

    async def seconds(self) -> float:
        """Seconds of audio recorded so far; closes the spool."""
        if self._spool is None:
            return self.pcm_seconds()
        spool, self._spool = self._spool, None
        try:
            return await asyncio.to_thread(encoded_seconds, spool) if self.raw_bytes else 0.0
        finally:
            spool.close()


def encoded_seconds(file: BinaryIO) -> float:
    """Duration of (possibly truncated) encoded audio, from its packets' durations. Blocking."""
    file.seek(0)
    try:
        with av.open(file, "r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                return 0.0
            stream = container.streams.audio[0]
            total = 0.0
            for packet in container.demux(stream):
                if packet.duration and packet.time_base:
                    total += float(packet.duration * packet.time_base)
            return total
    except (av.FFmpegError, ValueError, OSError):
        return 0.0
