"""Seconds of speech audio actually delivered to a client, measured from the bytes that went out.

Raw PCM is counted by its length, MP3 by its frame headers as it passes (mp3_frames). Other encoded
audio is kept in a spool (memory, then an unnamed temp file; writes to the file go through the audio
workers) as it passes and measured once at the end by demuxing it (packet durations; no decoding):
inline when it is small (a fraction of a millisecond, cheaper than a thread hand-off), on the audio
workers when it is large. For a stream the client abandoned, this is the audio it actually received.
"""

from __future__ import annotations

import base64
import json
import tempfile
from collections.abc import AsyncIterator
from typing import BinaryIO

from gateway.audio.duration import encoded_seconds
from gateway.audio.formats import OPENAI_PCM_RATE
from gateway.audio.mp3_frames import Mp3Clock
from gateway.audio.workers import AudioWorkers

_PCM_BYTES_PER_SECOND = OPENAI_PCM_RATE * 2
_INLINE_BYTES = 262_144
"""Encoded output up to this size is measured on the event loop (about 0.2 ms for 256 KiB of mp3)."""


class AudioMeter:
    def __init__(self, response_format: str, workers: AudioWorkers, *, sse: bool = False,
                 memory_bytes: int = 1_048_576) -> None:
        self.format = response_format
        self.sse = sse
        self._workers = workers
        self._memory_bytes = memory_bytes
        self.raw_bytes = 0
        self._pending = b""
        self._spool: BinaryIO | None = None
        self._clock = Mp3Clock() if response_format == "mp3" else None
        if response_format not in ("pcm", "mp3"):
            self._spool = tempfile.SpooledTemporaryFile(max_size=memory_bytes)  # type: ignore[assignment]

    async def tap(self, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Pass `chunks` through unchanged, recording them."""
        try:
            async for chunk in chunks:
                for audio in self._sse_audio(chunk) if self.sse else (chunk,):
                    await self._record(audio)
                yield chunk
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _record(self, audio: bytes) -> None:
        self.raw_bytes += len(audio)
        if self._clock is not None:
            self._clock.feed(audio)
        elif self._spool is not None and self.raw_bytes > self._memory_bytes:  # on disk, or rolling over now
            await self._workers.finish(self._spool.write, audio)
        elif self._spool is not None:
            self._spool.write(audio)

    def _sse_audio(self, chunk: bytes) -> list[bytes]:
        """OpenAI speech SSE: the audio is base64 in `speech.audio.delta` events."""
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        audio = []
        for line in lines:
            if not line.startswith(b"data:"):
                continue
            try:
                event = json.loads(line[5:])
                if event.get("type") == "speech.audio.delta":
                    audio.append(base64.b64decode(event.get("audio", "")))
            except (ValueError, AttributeError, TypeError):
                continue
        return audio

    @property
    def needs_decoding(self) -> bool:
        """Whether `seconds()` has to demux encoded audio (on the audio workers when large)."""
        return self._spool is not None

    def counted_seconds(self) -> float:
        """Seconds of PCM or MP3 recorded so far (known without demuxing)."""
        return self._clock.seconds if self._clock is not None else self.raw_bytes / _PCM_BYTES_PER_SECOND

    async def seconds(self) -> float:
        """Seconds of audio recorded so far; closes the spool."""
        if self._spool is None:
            return self.counted_seconds()
        spool, self._spool = self._spool, None
        try:
            if not self.raw_bytes:
                return 0.0
            if self.raw_bytes <= _INLINE_BYTES:
                return encoded_seconds(spool, self.format)
            return await self._workers.finish(encoded_seconds, spool, self.format)
        finally:
            spool.close()
