"""Wyoming's streamed transcripts (protocol 1.7+): the live exchange behind `WyomingAdapter.transcribe_live`.

The client sends what `transcribe` sends (`transcribe`, `audio-start`, `audio-chunk`..., `audio-stop`); a
streaming server (`info`: `asr[].supports_transcript_streaming`) answers `transcript-start`,
`transcript-chunk {text}`... as it hears, then `transcript` (for older clients) and `transcript-stop`. Chunks
that arrive while the audio is still being sent are read (and yielded) before the next audio chunk is sent.
Each chunk becomes a piece (gateway/adapters/live.py); the `transcript` adds only what the chunks did not say
(all of it, from a server that does not stream). The stream ends at `transcript-stop`, at the `transcript`
when nothing was streamed, or at EOF after the `transcript`. After `audio-stop` the whole rest must come
within the backend's `timeout_s` (each event within it too): an engine that keeps talking is cut off.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from wyoming.asr import Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.event import Event

from gateway.adapters.live import Pieces
from gateway.config import Backend
from gateway.errors import Reason, UpstreamError, UpstreamTimeoutError


class Conversation(Protocol):
    """The adapter's connection (wyoming._Connection): timed reads and writes, engine errors raised."""

    async def send(self, event: Event) -> None: ...
    async def receive(self) -> Event: ...
    def spoke(self) -> bool: ...


def streams_transcripts(asr: Any) -> bool:
    """Whether an `info`'s `asr` programs stream transcripts (`supports_transcript_streaming`)."""
    return isinstance(asr, list) and any(isinstance(p, Mapping) and p.get("supports_transcript_streaming") is True
                                         for p in asr)


async def heard_live(backend: Backend, conn: Conversation, request: list[Event],
                     audio: AsyncIterator[Event]) -> AsyncIterator[str]:
    """Send `request` then `audio` (ending with audio-stop) on `conn`, yielding the transcript's pieces."""
    heard = _Heard(backend)
    try:
        for event in request:
            await conn.send(event)
        async for event in audio:  # the caller closes `audio`
            while conn.spoke() and not heard.done:  # what it heard so far, as it says it
                if piece := heard.take(await conn.receive()):
                    yield piece
            await conn.send(event)
    except UpstreamError as exc:
        if exc.reason != Reason.DISCONNECT:
            raise
        # the engine hung up while we were sending: it may have said why first (read below)
    deadline = asyncio.get_running_loop().time() + backend.timeouts.read  # never a yield inside a timeout
    while not heard.done:
        try:
            async with asyncio.timeout_at(deadline):
                event = await conn.receive()
        except TimeoutError:
            raise UpstreamTimeoutError(f"Backend '{backend.name}' did not answer in time.",
                                       reason=Reason.TIMEOUT) from None
        except UpstreamError as exc:
            if exc.reason != Reason.DISCONNECT or not heard.final:
                raise
            return  # EOF after the transcript: a streaming server that hangs up instead of stopping
        if piece := heard.take(event):
            yield piece


class _Heard:
    """The transcript events so far, and the piece each adds."""

    def __init__(self, backend: Backend) -> None:
        self.pieces = Pieces(backend, spans=False)
        self.streaming = False
        """transcript-start or a transcript-chunk came: transcript-stop ends the stream."""
        self.final = False
        """The `transcript` came."""
        self.done = False

    def take(self, event: Event) -> str:
        """The piece `event` adds ("" for none); marks the end."""
        data = event.data if isinstance(event.data, Mapping) else {}
        if TranscriptStart.is_type(event.type):
            self.streaming = True
        elif TranscriptChunk.is_type(event.type) and not self.final:
            self.streaming = True
            return self.pieces.piece(data.get("text"))
        elif Transcript.is_type(event.type) and not self.final:
            self.final, self.done = True, not self.streaming
            return self.pieces.rest(data.get("text"))
        elif TranscriptStop.is_type(event.type):
            self.done = True
        return ""
