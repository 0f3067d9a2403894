"""What every HTTP engine adapter shares: bodies streamed or read to a cap under the transport-error
mapping, and an engine's error status mapped onto gateway errors the same way for every engine:

    engine 401/403  -> 502, "the gateway's credential for backend X was refused" (never the credential)
    engine 429      -> 429 with the engine's Retry-After (at least 1 s)
    engine 400/422  -> 400 with the engine's message and field, when it gave them
    engine 404      -> 502: the configured native model or path does not exist there
    engine 408/5xx  -> 502 (504 for 408/504: the engine itself timed out)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from gateway.adapters.base import upstream_errors
from gateway.config import Backend
from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    RateLimitError,
    UpstreamError,
    UpstreamTimeoutError,
)

_MAX_ERROR_BODY = 65_536
MAX_TRANSCRIPT_BYTES = 16 * 1024 * 1024


def _message(body: bytes) -> tuple[str | None, str | None]:
    """The engine's own message and field from an error body, if it is JSON and has them."""
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        return None, None
    if isinstance(parsed, dict):
        inner = parsed.get("error", parsed)
        if isinstance(inner, dict):
            message = inner.get("message") or inner.get("detail") or inner.get("err_msg")  # Deepgram: err_msg
            param = inner.get("param")
            if isinstance(message, (dict, list)):  # {"detail": {"status", "message"}} or FastAPI's [{loc, msg}]
                return _detail(message)
            return (str(message)[:500] if message else None), (param if isinstance(param, str) else None)
        if isinstance(inner, str):
            return inner[:500], None
        detail = parsed.get("detail")
        if isinstance(detail, str):
            return detail[:500], None
    return None, None


def _detail(detail: dict[str, Any] | list[Any]) -> tuple[str | None, str | None]:
    """ElevenLabs' `detail: {status, message}`, or FastAPI's `detail: [{loc: [..., field], msg}]`."""
    if isinstance(detail, dict):
        message = detail.get("message") or detail.get("status")
        return (str(message)[:500] if message else None), None
    first = detail[0] if detail and isinstance(detail[0], dict) else {}
    raw_loc = first.get("loc")
    loc = [x for x in raw_loc if isinstance(x, str)] if isinstance(raw_loc, list) else []
    message = first.get("msg")
    return (str(message)[:500] if message else None), (loc[-1] if loc and loc[-1] != "body" else None)


def _retry_after(response: aiohttp.ClientResponse) -> int:
    try:
        return max(1, int(float(response.headers.get("Retry-After", "1"))))
    except ValueError:
        return 1


def error_for(backend: Backend, status: int, body: bytes, response: aiohttp.ClientResponse) -> GatewayError:
    name = backend.name
    message, param = _message(body)
    if status in (401, 403):
        return UpstreamError(f"The gateway's credential for backend '{name}' was refused.",
                             reason="backend_auth", should_retry=False)
    if status == 429:
        return RateLimitError(f"Backend '{name}' is rate limiting the gateway; retry later.",
                              retry_after=_retry_after(response), reason="backend_rate_limit")
    if status in (400, 413, 415, 422):
        return InvalidRequestError(f"Backend '{name}' rejected the request: {message or 'invalid request'}",
                                   param=param, reason="backend_rejected")
    if status in (408, 504):
        return UpstreamTimeoutError(f"Backend '{name}' timed out.", reason="backend_timeout")
    if status == 404:
        return UpstreamError(f"Backend '{name}' does not serve the configured model or path.",
                             reason="backend_not_found")
    return UpstreamError(f"Backend '{name}' failed with status {status}.", reason=f"backend_{status // 100}xx")


async def raise_for_status(backend: Backend, response: aiohttp.ClientResponse) -> None:
    """Raise the mapped error (after reading a bounded error body) unless the status is 2xx."""
    if response.status < 300:
        return
    try:
        body = await read_capped(response, _MAX_ERROR_BODY)
    except (aiohttp.ClientError, TimeoutError):
        body = b""
    finally:
        response.release()
    raise error_for(backend, response.status, body, response)


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
        raise UpstreamError(f"Backend '{backend.name}' sent an oversized transcript.", reason="bad_response")
    return body


async def stream_body(backend: Backend, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """A body chunk by chunk as it arrives, transport failures mapped; released when done or closed."""
    try:
        with upstream_errors(backend):
            async for chunk in response.content.iter_any():
                yield chunk
    finally:
        response.release()


async def probe(backend: Backend, http: aiohttp.ClientSession, url: str, headers: dict[str, str],
                up: Callable[[int], bool] = lambda status: 200 <= status < 300) -> bool:
    """A readiness GET that never bills: True when it answers in time with a status `up` accepts."""
    try:
        async with http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=backend.timeouts.connect)) as r:
            return up(r.status)
    except (aiohttp.ClientError, TimeoutError):
        return False
