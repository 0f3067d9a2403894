"""The request pipeline's stages: request id, access log, metering, OpenAI errors, authentication.

Their order is set in `gateway.app.build_app`; each stage here is small and does one thing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
import uuid
from typing import Any

from aiohttp import web

from gateway.auth import authenticate, presented_key
from gateway.errors import GatewayError, from_http_exception
from gateway.metering import endpoint_of
from gateway.realtime import PATH as REALTIME_PATH
from gateway.state import FAILURE, IDENTITY, METRICS, OUTCOME, PREPARED, REQUEST_ID, TABLE
from gateway.streaming import abandon
from gateway.usage import Outcome, measure_then_record, record

access_log = logging.getLogger("gateway.access")
log = logging.getLogger("gateway")

PID = os.getpid()
"""In the access log: which process served (`serve --workers N` spawns each worker afresh, never forks)."""
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@web.middleware
async def request_id_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Adopt the client's x-request-id when it is sane, else mint one; the header is added on prepare."""
    given = request.headers.get("X-Request-ID", "")
    request[REQUEST_ID] = given if _CLIENT_REQUEST_ID.match(given) else f"req_{uuid.uuid4().hex}"
    return await handler(request)


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare hook: every response, streamed or not, success or error, carries the id."""
    if REQUEST_ID in request:
        response.headers["x-request-id"] = request[REQUEST_ID]


@web.middleware
async def access_log_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """One JSON line per finished request, also when the client went away (status 499)."""
    outcome = request[OUTCOME] = Outcome(endpoint=request.path)
    try:
        response = await handler(request)
        outcome.sent(response)
        return response
    finally:
        status = outcome.status or 499  # a client that left before any response: nginx's 499
        identity = request.get(IDENTITY)
        failure = request.get(FAILURE)
        record = {
            "request_id": request.get(REQUEST_ID),
            "tenant": identity.tenant if identity else None,
            "key": identity.key_name if identity else None,
            "method": request.method,
            "endpoint": request.path,
            "model": outcome.public_model,
            "backend": outcome.backend,
            "native_model": outcome.native_model,
            "status": status,
            "bytes_in": outcome.bytes_in or request.content_length or 0,
            "bytes_out": outcome.bytes_out,
            "latency_ms": round((time.monotonic() - outcome.started) * 1000, 1),
            "pid": PID,
        }
        if failure is not None:
            record["error"] = failure.reason
        if outcome.rejected_by:
            record["rejected_by"] = outcome.rejected_by
        if outcome.attempts:
            record["attempts"] = outcome.attempts
        if outcome.more_attempts:
            record["more_attempts"] = outcome.more_attempts
        if outcome.chunks is not None:
            record["chunks"] = outcome.chunks
        if outcome.failed_after_first_byte:
            record["cut_after_first_byte"] = outcome.failed_after_first_byte
        access_log.info(json.dumps(record))


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Everything raised inside becomes an OpenAI error body with the right status, unless a response was
    already prepared: then no second one may follow, and the first-byte rule ends it (gateway.streaming)."""
    try:
        return await handler(request)
    except Exception as exc:
        if PREPARED in request:
            return await abandon(request, exc)
        return _error_response(request, exc)


def _error_response(request: web.Request, exc: Exception) -> web.StreamResponse:
    if isinstance(exc, GatewayError):
        request[FAILURE] = exc
        return exc.response()
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        err = from_http_exception(exc, request)
        request[FAILURE] = err
        response = err.response()
        if "Allow" in exc.headers:  # a 405 must name the allowed methods (RFC 9110 15.5.6)
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    if isinstance(exc, ConnectionResetError):
        raise exc
    rid = request.get(REQUEST_ID, "-")
    log.error("unhandled error in request %s", rid, exc_info=exc)
    err = GatewayError(
        "The server had an error processing your request. You can retry your request; "
        f"please include the request ID {rid} if you report it."
    )
    request[FAILURE] = err
    return err.response()


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Resolve the client's gateway key to an identity for /v1 routes (CORS preflights excepted, and the realtime
    WebSocket, which answers a bad key after the upgrade as OpenAI does: gateway/realtime/endpoint.py)."""
    if request.path.startswith("/v1/") and request.method != "OPTIONS" and request.path != REALTIME_PATH:
        request[IDENTITY] = authenticate(request[TABLE].config, presented_key(request))
    return await handler(request)


@web.middleware
async def metering_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Counts the request in flight, then bills and records it once it is over, whatever happened.
    Measuring encoded speech output takes a worker thread; that wait is shielded, so a client
    disconnect cannot cut the recording short or skip it. Everything else records synchronously."""
    endpoint = endpoint_of(request)
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.in_flight.labels(endpoint).inc()
    outcome = request[OUTCOME]
    try:
        response = await handler(request)
        outcome.sent(response)
        return response
    finally:
        if metrics is not None:
            metrics.in_flight.labels(endpoint).dec()
        meter = outcome.meter
        if meter is not None and meter.needs_decoding:
            await asyncio.shield(measure_then_record(request, endpoint, outcome.status or 499))
        else:
            if meter is not None:
                outcome.audio_delivered(meter.counted_seconds())
            record(request, endpoint, outcome.status or 499)
