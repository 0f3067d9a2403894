"""What every HTTP engine adapter shares: bodies streamed or read to a cap under the transport-error
mapping, and an engine's failure status mapped onto gateway errors (gateway.adapters.engine_errors).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping

import aiohttp

from gateway.adapters.base import upstream_errors
from gateway.adapters.engine_errors import Refine, complaint, error_for
from gateway.config import Backend
from gateway.errors import Reason, UpstreamError

MAX_ERROR_BODY = 65_536
MAX_TRANSCRIPT_BYTES = 16 * 1024 * 1024
"""A transcript body or transcript event stream larger than this is garbage (an hour of speech is ~1 MB of JSON)."""


def request_timeout(backend: Backend) -> aiohttp.ClientTimeout:
    """No cap on a whole call (a stream lasts as long as the speech); `connect` covers the wait for a free
    connection in the backend's pool (max_connections, gateway.upstreams) and connecting; `sock_read` is
    the longest silence between two reads."""
    return aiohttp.ClientTimeout(total=None, connect=backend.timeouts.connect, sock_connect=backend.timeouts.connect,
                                 sock_read=backend.timeouts.read)


async def raise_for_status(backend: Backend, response: aiohttp.ClientResponse, *,
                           fields: Mapping[str, str] | None = None, refine: Refine | None = None) -> None:
    """Raise the mapped error (after reading a bounded error body) unless the status is 2xx: the adapter's
    `refine` first, else the common mapping with the adapter's field renames."""
    if response.status < 300:
        return
    try:
        body = await read_capped(response, MAX_ERROR_BODY)
    except (aiohttp.ClientError, TimeoutError):
        body = b""
    finally:
        response.release()
    said = complaint(backend, response.status, body, response.headers)
    raise (refine(said) if refine else None) or error_for(backend, said, fields)


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or its first `limit` bytes (`content.read(n)` returns after one socket read)."""
    body = bytearray()
    while len(body) < limit and (chunk := await response.content.read(limit - len(body))):
        body += chunk
    return bytes(body)


async def read_transcript(backend: Backend, response: aiohttp.ClientResponse) -> bytes:
    """A 2xx transcript body, whole; released afterwards. Larger than MAX_TRANSCRIPT_BYTES is garbage."""
    try:
        with upstream_errors(backend):
            body = await read_capped(response, MAX_TRANSCRIPT_BYTES + 1)
    finally:
        response.release()
    if len(body) > MAX_TRANSCRIPT_BYTES:
        raise UpstreamError(f"Backend '{backend.name}' sent an oversized transcript.", reason=Reason.BAD_RESPONSE)
    return body


async def stream_body(backend: Backend, response: aiohttp.ClientResponse,
                      limit: int | None = None) -> AsyncIterator[bytes]:
    """A body chunk by chunk as it arrives, transport failures mapped; released when done or closed. With
    `limit`, a body growing past it fails (an engine's event stream that never ends is garbage, not a transcript)."""
    received = 0
    try:
        with upstream_errors(backend):
            async for chunk in response.content.iter_any():
                received += len(chunk)
                if limit is not None and received > limit:
                    raise UpstreamError(f"Backend '{backend.name}' sent an oversized answer.",
                                        reason=Reason.BAD_RESPONSE)
                yield chunk
    finally:
        response.release()


async def probe(backend: Backend, http: aiohttp.ClientSession, url: str, headers: dict[str, str],
                up: Callable[[int], bool] = lambda status: 200 <= status < 300, *, method: str = "GET",
                allow_redirects: bool = True) -> bool:
    """A readiness GET (or HEAD) that never bills: True when it answers in time with a status `up` accepts."""
    try:
        async with http.request(method, url, headers=headers, allow_redirects=allow_redirects,
                                timeout=aiohttp.ClientTimeout(total=backend.timeouts.connect)) as r:
            return up(r.status)
    except (aiohttp.ClientError, TimeoutError):
        return False
