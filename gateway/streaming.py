"""Relaying streams to the client, and the one rule for failures: "after the first byte".

Before the first chunk, nothing has been sent: a failure is an ordinary OpenAI error (and the
handler may fail over to the next route). After it, the status and headers are gone, so a failure
becomes an SSE `error` event (for event streams) or a cut connection (for raw audio, so the client
sees a truncated body rather than a valid-looking short file). Either way it is logged and recorded
in the request's Outcome. That rule covers every exception, not only the gateway's own errors (an
unexpected one is logged with its traceback), and also one that escapes a handler after its response
was prepared: `error_middleware` hands it to `abandon` here instead of writing a second response
(Starlette's "response already started" rule). That rule lives here and nowhere else.

`Stages` is the one way an engine stream is closed: it owns the engine's chunks and every stage built
on them, and closes them all, outermost first, on every path.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack

from aiohttp import web

from gateway.errors import GatewayError
from gateway.policy.admission import free_slots
from gateway.state import OUTCOME, PREPARED, REQUEST_ID
from gateway.transcript import Transcript

log = logging.getLogger("gateway.streaming")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Stages:
    """One attempt's engine stream and each stage built on it (transcoder, meter, SSE framing).

    Stages do not close their input; this owner closes every one, outermost first (so a transcoder
    stops reading before the engine stream under it is closed), whether or not it ever started, and
    the rest even when one fails to close. Iterating it iterates the outermost stage."""

    def __init__(self, source: AsyncIterator[bytes]) -> None:
        self._stages = [source]

    def add(self, stage: Callable[[AsyncIterator[bytes]], AsyncIterator[bytes]]) -> None:
        """Put `stage` on top: it reads from the current outermost stage."""
        self._stages.append(stage(self._stages[-1]))

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._stages[-1].__aiter__()

    async def aclose(self) -> None:
        async with AsyncExitStack() as stack:
            for stage in self._stages:  # the exit stack calls them last-in first
                if (aclose := getattr(stage, "aclose", None)) is not None:
                    stack.push_async_callback(aclose)


Closable = Stages | AsyncGenerator[bytes, None]
"""A stream its reader closes when done with it."""


async def first_chunk(chunks: Closable) -> bytes:
    """The stream's first non-empty chunk; errors here are still ordinary errors. Closes on failure."""
    try:
        async for chunk in chunks:
            if chunk:
                return chunk
        return b""
    except BaseException:
        await chunks.aclose()
        raise


async def relay(request: web.Request, first: bytes, rest: Closable, content_type: str,
                *, sse: bool = False) -> web.StreamResponse:
    """Send `first` then `rest` to the client chunk by chunk (chunked transfer), applying the rule.
    Closes `rest` on every path."""
    outcome = request[OUTCOME]
    response = web.StreamResponse(headers=SSE_HEADERS if sse else None)
    response.content_type = content_type
    response.enable_chunked_encoding()

    tail = b"\n\n"

    async def write(chunk: bytes) -> None:
        nonlocal tail
        await response.write(chunk)
        outcome.wrote(len(chunk))  # what went out, also when the stream is cut later
        tail = (tail + chunk[-2:])[-2:]

    async def write_sse_error(event: bytes) -> None:
        # A relayed event may have been cut mid-way: end it first, so the error is an event of its own.
        await write(event if tail.endswith(b"\n\n") else b"\n\n" + event)

    failure: Exception | None = None
    try:
        await _prepare(request, response)
        await write(first)
        async for chunk in rest:
            if chunk:
                await write(chunk)
        await free_slots(request)
        await response.write_eof()
        outcome.finished()
    except Exception as exc:
        failure = exc
    finally:
        try:
            await rest.aclose()
        except Exception as exc:  # a stage that fails to close: the same rule, once
            failure = failure or exc
    if failure is None:
        return response
    if request.get(PREPARED) is not response:
        raise failure  # prepare itself failed, nothing went out: still an ordinary error
    return await abandon(request, failure, write_sse_error if sse else None)


async def send(request: web.Request, response: web.Response) -> web.Response:
    """Send a whole response now, so the request counts as completed only once its body went out."""
    outcome = request[OUTCOME]
    await _prepare(request, response)
    await free_slots(request)
    await response.write_eof()
    outcome.finished(response.body_length)
    return response


async def _prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Send the status line and headers; from here on an exception cannot become an error response."""
    await response.prepare(request)
    request[PREPARED] = response
    request[OUTCOME].mark_first_byte()


async def abandon(request: web.Request, exc: Exception,
                  write_sse: Callable[[bytes], Awaitable[None]] | None = None) -> web.StreamResponse:
    """End the prepared response after `exc`, as the rule says, and return it for the middlewares to
    record (its status, what went out, `cut_after_first_byte`). A client that went away is an ordinary
    end (499, no traceback); a stream already complete is left as the client got it, the error only
    logged. Anything else is logged once, with its traceback unless it is one of the gateway's own
    errors, then ends the stream: with an SSE error event when `write_sse` is given, else by cutting
    the connection so the chunked body is never terminated."""
    response, outcome, rid = request[PREPARED], request[OUTCOME], request.get(REQUEST_ID)
    if isinstance(exc, ConnectionError):
        outcome.client_left()
        return response
    if outcome.completed:
        log.error("request %s: failed after its response was sent whole", rid, exc_info=exc)
        return response
    error = exc if isinstance(exc, GatewayError) else GatewayError(
        f"The server had an error while streaming the response. Please include the request ID {rid} "
        "if you report it.", reason="server_error")
    outcome.cut(error.reason)
    if error is exc:
        log.warning("request %s: stream failed after the first byte (%s): %s", rid, error.reason, error.message)
    else:
        log.error("request %s: stream failed after the first byte", rid, exc_info=exc)
    if write_sse is not None:
        try:
            await write_sse(sse_event(error.body()))
            await response.write_eof()
            return response
        except ConnectionError:
            pass  # the event could not go out either: cut, as for raw audio
    if request.transport is not None:
        request.transport.close()  # the chunked body is never terminated: the client sees a truncated body
    return response


def sse_event(payload: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def speech_sse(chunks: AsyncIterator[bytes], input_chars: int) -> AsyncIterator[bytes]:
    """Raw audio chunks as OpenAI's speech SSE: `speech.audio.delta` events, then `speech.audio.done`."""
    produced = 0
    async for chunk in chunks:
        if chunk:
            produced += len(chunk)
            yield sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(chunk).decode()})
    # The gateway meters characters and seconds, not tokens; these are its nearest honest counts.
    output_tokens = produced // 1024
    yield sse_event({"type": "speech.audio.done", "usage": {
        "input_tokens": input_chars, "output_tokens": output_tokens,
        "total_tokens": input_chars + output_tokens}})


async def transcript_sse(transcript: Transcript) -> AsyncIterator[bytes]:
    """A finished transcript as OpenAI's transcription SSE: one delta per segment, then `done`. The deltas add up
    to the text, as OpenAI's do: segments joined by one space, whatever spaces an engine put around them."""
    texts = [t for s in transcript.segments if (t := " ".join(s.text.split()))]
    pieces = [texts[0], *(" " + t for t in texts[1:])] if texts else [transcript.text] if transcript.text else []
    for piece in pieces:
        yield sse_event({"type": "transcript.text.delta", "delta": piece})
    # OpenAI's schema allows only token usage on this event; the gateway counts seconds, so it sends none.
    yield sse_event({"type": "transcript.text.done", "text": transcript.text})
