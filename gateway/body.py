"""Receiving a request body: the declared-length check, `Expect: 100-continue`, and the gap timeout.

aiohttp answers `Expect: 100-continue` in the route's expect handler, which runs before every
middleware: a client with a missing key or a 30 MB declared upload would be told to send it. Our
routes' expect handler (`defer_continue`) therefore writes nothing; `receiving` writes
"100 Continue" just before the body is first read, that is after authentication and the
Content-Length check passed. A request answered while its client still waits for the 100 is closed
after the answer (`connections.GuardedHandler.finish_response`): the body never came, so the
connection cannot carry another request.

The gap timeout (`server.body_timeout_s`) is the longest wait between two arrivals of body bytes,
not a cap on the upload: the deadline moves each time bytes arrive (see `GuardedHandler.data_received`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import hdrs, web
from aiohttp.web_protocol import RequestPayloadError

from gateway.connections import GuardedHandler, awaits_continue
from gateway.errors import ExpectationFailedError, InvalidRequestError, PayloadTooLargeError, RequestTimeoutError
from gateway.state import CONTINUED

JSON_BODY_LIMIT = 1_048_576
"""Speech bodies are JSON with at most 2 x 4096 characters of text; uploads have max_upload_bytes."""


async def defer_continue(request: web.Request) -> None:
    """Every route's expect handler: answer nothing yet (`receiving` does, once the request passed)."""
    return None


def check_length(request: web.Request, max_bytes: int) -> None:
    """A declared Content-Length over the limit is refused before a byte of the body is read."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large(max_bytes, request.content_length)


def too_large(limit: int, seen: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"Maximum content size limit ({limit}) exceeded ({seen} bytes read).")


@asynccontextmanager
async def receiving(request: web.Request, max_bytes: int) -> AsyncIterator[None]:
    """The block that reads the body: length checked, Expect answered, stalls and bad framing mapped.

    A stalled body becomes a 408 and a malformed one (bad chunking or compression) a 400; either way the
    connection is closed after the answer, since the rest of the body can no longer be found.
    """
    check_length(request, max_bytes)
    expect = request.headers.get(hdrs.EXPECT)
    if expect is not None and expect.lower() != "100-continue":
        raise ExpectationFailedError("The only supported Expect header value is 100-continue.")
    if awaits_continue(request):
        request[CONTINUED] = True
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the response proper has not started (as aiohttp's own handler does)
    guard = request.protocol if isinstance(request.protocol, GuardedHandler) else None
    seconds = guard.limits.body_timeout_s if guard is not None else None
    try:
        async with asyncio.timeout(seconds) as deadline:
            if guard is not None:
                guard.watch_body(deadline)
            try:
                yield
            finally:
                if guard is not None:
                    guard.watch_body(None)
    except TimeoutError:
        if not deadline.expired():
            raise
        if guard is not None:
            guard.close_after(request)
        raise RequestTimeoutError(f"The request body stalled: no data for {seconds:g} seconds.") from None
    except RequestPayloadError:
        if guard is not None:
            guard.close_after(request)
        raise InvalidRequestError("The request body could not be read: its chunked encoding, length or "
                                  "Content-Encoding does not match what was sent.") from None


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole (small) body, at most `limit` bytes, read under `receiving`'s rules."""
    chunks: list[bytes] = []
    total = 0
    async with receiving(request, limit):
        while chunk := await request.content.readany():
            total += len(chunk)
            if total > limit:
                raise too_large(limit, total)
            chunks.append(chunk)
    return b"".join(chunks)
