"""Calling a model's routes in failover order: the next route is tried only before the first byte."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from gateway.errors import REASONS, GatewayError, RateLimitError, UpstreamError
from gateway.metering import endpoint_of
from gateway.state import METRICS, REQUEST_ID
from gateway.table import Candidate

log = logging.getLogger("gateway.routing")
T = TypeVar("T")


async def first_success(request: web.Request, candidates: list[Candidate],
                        attempt: Callable[[Candidate], Awaitable[T]]) -> T:
    """`attempt` each candidate in order until one succeeds. Only backend failures (UpstreamError:
    unreachable, 5xx, timeout, garbage) and a backend's own rate limit move on to the next route (spill-over
    is what routes are for); the client's own errors do not. The last route's error is the client's."""
    metrics = request.app.get(METRICS)
    for i, candidate in enumerate(candidates):
        started = time.monotonic()
        try:
            result = await attempt(candidate)
        except GatewayError as exc:
            if metrics is not None and (isinstance(exc, UpstreamError | RateLimitError) or exc.reason in REASONS):
                metrics.upstream_error(candidate.route.backend, exc.reason)
            if not _fails_over(exc) or i == len(candidates) - 1:
                raise
            log.warning("request %s: backend '%s' failed (%s); failing over to '%s'",
                        request.get(REQUEST_ID), candidate.route.backend, exc.reason,
                        candidates[i + 1].route.backend)
            continue
        if metrics is not None:
            metrics.upstream.labels(candidate.route.backend, endpoint_of(request)).observe(time.monotonic() - started)
        return result
    raise AssertionError("no candidates")  # candidates is never empty (Table.candidates ensures it)


def _fails_over(exc: GatewayError) -> bool:
    """The backend failed or is full (its 429), as opposed to the gateway's or the client's own limits."""
    return isinstance(exc, UpstreamError) or (isinstance(exc, RateLimitError) and exc.reason == "backend_rate_limit")
