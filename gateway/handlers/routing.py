"""Calling a model's routes in failover order: the next route is tried only before the first byte."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from gateway.balance import ORDERED, order
from gateway.ejection import BUSY, FAILURE, SUCCESS, UNDECIDED
from gateway.errors import REASONS, GatewayError, RateLimitError, Reason, UpstreamError
from gateway.metering import endpoint_of
from gateway.state import EJECTIONS, IN_FLIGHT, METRICS, REQUEST_ID
from gateway.table import Candidate

log = logging.getLogger("gateway.routing")
T = TypeVar("T")


async def first_success(request: web.Request, candidates: list[Candidate],
                        attempt: Callable[[Candidate], Awaitable[T]], balance: str = ORDERED) -> T:
    """`attempt` each candidate until one succeeds, in the order the model's `balance` makes
    (gateway/balance.py), skipping ejected backends (gateway/ejection.py), each outcome fed back to them.
    Each attempt counts as in flight to its backend until it fails, or, when it answered, until the request
    is over. Only backend failures (UpstreamError: unreachable, 5xx, timeout, garbage) and a backend's own
    rate limit move on to the next route (spill-over is what routes are for); the client's own errors do
    not. The last route's error is the client's."""
    metrics = request.app.get(METRICS)
    ejections = request.app[EJECTIONS]
    in_flight = request.app[IN_FLIGHT]
    picked = ejections.pick(order(candidates, balance, in_flight.counts))
    for i, (candidate, forced) in enumerate(picked):
        started, backend, outcome = time.monotonic(), candidate.adapter.backend, UNDECIDED
        trial = ejections.begin(backend)
        if trial is None and not forced and i < len(picked) - 1:
            continue  # ejected, or its one trial is taken, since `pick`
        in_flight.start(backend.name)
        held = False
        try:
            result = await attempt(candidate)
            outcome, held = SUCCESS, True
            in_flight.hold(request, backend.name)
        except GatewayError as exc:
            outcome = _outcome(exc)
            if metrics is not None and (isinstance(exc, UpstreamError | RateLimitError) or exc.reason in REASONS):
                metrics.upstream_error(candidate.route.backend, exc.reason)
            if not _fails_over(exc) or i == len(picked) - 1:
                raise
            log.warning("request %s: backend '%s' failed (%s); failing over to '%s'",
                        request.get(REQUEST_ID), candidate.route.backend, exc.reason,
                        picked[i + 1][0].route.backend)
            continue
        finally:  # a cancelled attempt (the client left) decides nothing, but frees the trial
            ejections.record(backend, outcome, bool(trial))
            if not held:
                in_flight.end(backend.name)
        if metrics is not None:
            metrics.upstream.labels(candidate.route.backend, endpoint_of(request)).observe(time.monotonic() - started)
        return result
    raise AssertionError("no candidates")  # candidates is never empty (Table.candidates ensures it)


def _outcome(exc: GatewayError) -> str:
    """What a failed attempt says of its backend: it failed, it is busy (its 429), or it answered (the
    client's own error, relayed). An adapter closed under the request (a reload, shutdown) says nothing."""
    if exc.reason == Reason.CLOSED:
        return UNDECIDED
    if isinstance(exc, UpstreamError):
        return FAILURE
    if isinstance(exc, RateLimitError) and exc.reason == Reason.BACKEND_RATE_LIMIT:
        return BUSY
    return SUCCESS if exc.reason in REASONS else UNDECIDED  # the gateway's own refusals say nothing of it


def _fails_over(exc: GatewayError) -> bool:
    """The backend failed or is full (its 429), as opposed to the gateway's or the client's own limits."""
    return isinstance(exc, UpstreamError) or (isinstance(exc, RateLimitError) and exc.reason == "backend_rate_limit")
