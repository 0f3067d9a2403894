"""Calling a model's routes in failover order: the next route is tried only before the first byte."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from gateway.errors import UpstreamError
from gateway.mapping import Candidate
from gateway.state import REQUEST_ID

log = logging.getLogger("gateway.routing")
T = TypeVar("T")


async def first_success(request: web.Request, candidates: list[Candidate],
                        attempt: Callable[[Candidate], Awaitable[T]]) -> T:
    """`attempt` each candidate in order until one succeeds. Only backend failures (UpstreamError:
    unreachable, 5xx, timeout, garbage) move on to the next route; the client's own errors do not."""
    for i, candidate in enumerate(candidates):
        try:
            return await attempt(candidate)
        except UpstreamError as exc:
            if i == len(candidates) - 1:
                raise
            log.warning("request %s: backend '%s' failed (%s); failing over to '%s'",
                        request.get(REQUEST_ID), candidate.route.backend, exc.reason,
                        candidates[i + 1].route.backend)
    raise AssertionError("no candidates")  # candidates is never empty (Table.candidates ensures it)
