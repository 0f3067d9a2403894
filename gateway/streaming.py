"""Relaying streams to the client, and the one rule for failures: "after the first byte".

Before the first chunk, nothing has been sent: a failure is an ordinary OpenAI error (and the
handler may fail over to the next route). After it, the status and headers are gone, so a failure
becomes an SSE `error` event (for event streams) or a cut connection (for raw audio, so the client
sees a truncated body rather than a valid-looking short file). Either way it is logged and recorded
in the request's Outcome. That rule lives here and nowhere else.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from gateway.errors import GatewayError
from gateway.state import OUTCOME, REQUEST_ID
from gateway.transcript import Transcript

log = logging.getLogger("gateway.streaming")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def first_chunk(chunks: AsyncIterator[bytes]) -> bytes:
    """The stream's first non-empty chunk; errors here are still ordinary errors. Closes on failure."""
    try:
        async for chunk in chunks:
            if chunk:
                return chunk
        return b""
    except BaseException:
        await _aclose(chunks)
        raise


async def relay(request: web.Request, first: bytes, rest: AsyncIterator[bytes], content_type: str,
                *, sse: bool = False) -> web.StreamResponse:
    """Send `first` then `rest` to the client chunk by chunk (chunked transfer), applying the rule."""
    outcome = request[OUTCOME]
    response = web.StreamResponse(headers=SSE_HEADERS if sse else None)
    response.content_type = content_type
    response.enable_chunked_encoding()

    tail = b"\n\n"

    async def write(chunk: bytes) -> None:
        nonlocal tail
        await response.write(chunk)
        outcome.bytes_out += len(chunk)  # what went out, also when the stream is cut later
        tail = (tail + chunk)[-2:]

    async def write_sse_error(event: bytes) -> None:
        # A relayed event may have been cut mid-way: end it first, so the error is an event of its own.
        await write(event if tail.endswith(b"\n\n") else b"\n\n" + event)

    try:
        await response.prepare(request)
        outcome.mark_first_byte()
        await write(first)
        async for chunk in rest:
            if chunk:
                await write(chunk)
        await response.write_eof()
        outcome.completed = True
    except GatewayError as exc:
        await _after_first_byte(request, response, exc, write_sse_error if sse else None)
    except ConnectionError:  # the client went away: an ordinary end, recorded as 499 without a traceback
        outcome.client_gone = True
    finally:
        await _aclose(rest)
    return response


async def send(request: web.Request, response: web.Response) -> web.Response:
    """Send a whole response now, so the request counts as completed only once its body went out."""
    outcome = request[OUTCOME]
    await response.prepare(request)
    outcome.mark_first_byte()
    await response.write_eof()
    outcome.bytes_out = response.body_length
    outcome.completed = True
    return response


async def _after_first_byte(request: web.Request, response: web.StreamResponse, exc: GatewayError,
                            write_sse: Callable[[bytes], Awaitable[None]] | None) -> None:
    outcome = request[OUTCOME]
    outcome.failed_after_first_byte = exc.reason
    log.warning("request %s: stream failed after the first byte (%s): %s",
                request.get(REQUEST_ID), exc.reason, exc.message)
    if write_sse is not None:
        await write_sse(sse_event(exc.body()))
        await response.write_eof()
    elif request.transport is not None:
        request.transport.close()


def sse_event(payload: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def speech_sse(chunks: AsyncIterator[bytes], input_chars: int) -> AsyncIterator[bytes]:
    """Raw audio chunks as OpenAI's speech SSE: `speech.audio.delta` events, then `speech.audio.done`."""
    produced = 0
    try:
        async for chunk in chunks:
            if chunk:
                produced += len(chunk)
                yield sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(chunk).decode()})
    finally:
        await _aclose(chunks)
    # The gateway meters characters and seconds, not tokens; these are its nearest honest counts.
    output_tokens = produced // 1024
    yield sse_event({"type": "speech.audio.done", "usage": {
        "input_tokens": input_chars, "output_tokens": output_tokens,
        "total_tokens": input_chars + output_tokens}})


async def _aclose(chunks: AsyncIterator[bytes]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


async def transcript_sse(transcript: Transcript) -> AsyncIterator[bytes]:
    """A finished transcript as OpenAI's transcription SSE: one delta per segment, then `done`."""
    pieces = [s.text for s in transcript.segments] or ([transcript.text] if transcript.text else [])
    for piece in pieces:
        yield sse_event({"type": "transcript.text.delta", "delta": piece})
    # OpenAI's schema allows only token usage on this event; the gateway counts seconds, so it sends none.
    yield sse_event({"type": "transcript.text.done", "text": transcript.text})
