"""Calling a model's routes: balancing, ejection, admission, failover and retries, all before the first byte.

One request's routes are tried in the order its model's `balance` makes (gateway/balance.py), ejected
backends skipped (gateway/ejection.py). A route whose backend has a free slot (gateway/capacity.py) is tried
at once; one whose backend is saturated is set aside, and tried only after every route with a free slot
failed: then the request waits in its queue. So a lower priority is reached when every route above is
ejected, saturated or failed for this request. Routes whose failure was transient are then tried again,
after a backoff (gateway/retry.py). The first answer wins; the last failure is the client's error.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from aiohttp import web

from gateway.balance import order
from gateway.capacity import FULL, Refused, Slot, rank
from gateway.ejection import BUSY, FAILURE, SUCCESS, UNDECIDED
from gateway.errors import REASONS, GatewayError, RateLimitError, Reason, ServiceUnavailableError, UpstreamError
from gateway.metering import endpoint_of
from gateway.models import Model
from gateway.retry import FINAL
from gateway.state import EJECTIONS, GATES, IDENTITY, IN_FLIGHT, METRICS, OUTCOME, REQUEST_ID, TABLE
from gateway.table import Candidate

log = logging.getLogger("gateway.routing")
T = TypeVar("T")


async def first_success(request: web.Request, candidates: list[Candidate],
                        attempt: Callable[[Candidate], Awaitable[T]], model: Model, *, hold: bool = True) -> T:
    """`attempt` candidates until one succeeds. Only backend failures (UpstreamError: unreachable, 5xx,
    timeout, garbage), a backend's own rate limit and a full or timed-out queue move on to another route;
    the client's own errors do not. The attempt that succeeds keeps its backend slot until the request is over
    (its answer may still be streaming), or with `hold=False` gives it back at once (a long upload's chunk, whose
    answer is whole, while other chunks of the request still need slots)."""
    return await _Routing(request, model, attempt, hold).run(candidates)


class _Routing(Generic[T]):
    """One request's way through its model's routes."""

    def __init__(self, request: web.Request, model: Model, attempt: Callable[[Candidate], Awaitable[T]],
                 hold: bool) -> None:
        app = request.app
        self.request, self.model, self.attempt, self.hold = request, model, attempt, hold
        self.metrics, self.ejections, self.in_flight, self.gates = (
            app.get(METRICS), app[EJECTIONS], app[IN_FLIGHT], app[GATES])
        self.started = time.monotonic()
        self.retry_at: dict[int, float | None] = {}
        """Per candidate (its position in the order) that failed: when it may be tried again (monotonic), or
        None: not again."""
        self.last: tuple[str, GatewayError] | None = None
        """The last failure: its backend and error."""
        self.tries: dict[int, int] = {}

    async def run(self, candidates: list[Candidate]) -> T:
        ordered = order(candidates, self.model.balance, self.in_flight.counts)
        todo, due = list(range(len(ordered))), dict[int, float]()
        while todo:
            picked = _positions(todo, ordered, self.ejections.pick([ordered[i] for i in todo]))
            saturated: list[tuple[int, bool]] = []
            for n, (i, forced) in enumerate(picked):
                if (wait := due.get(i, 0.0) - time.monotonic()) > 0:
                    await asyncio.sleep(wait)  # a retry's backoff
                slot = await self.gates.enter(ordered[i].route.backend)
                if slot is None:
                    saturated.append((i, forced))
                    continue
                found = await self._try(ordered[i], i, slot, forced, more=n < len(picked) - 1 or bool(saturated))
                if found is not _MISS:
                    return found  # type: ignore[return-value]
            for n, (i, forced) in enumerate(saturated):
                c, queued = ordered[i], time.monotonic()
                try:
                    slot = await self.gates.wait(c.route.backend, rank(self.request[IDENTITY],
                                                                      self.request[TABLE].config.policy))
                except Refused as refused:  # noted as an attempt, so the access log names the route that refused
                    outcome = self.request[OUTCOME]
                    outcome.route(self.model.name, c.route.backend, c.route.model)
                    outcome.attempted(c.route.backend, refused.reason, time.monotonic() - queued)
                    self._failed(c, i, _refusal(refused, self.model.name))
                    continue
                found = await self._try(c, i, slot, forced, more=n < len(saturated) - 1)
                if found is not _MISS:
                    return found  # type: ignore[return-value]
            due = {i: at for i, at in self.retry_at.items() if at is not None}
            todo = sorted(due, key=lambda i: (due[i], i))
            self.retry_at = {}  # each retry is planned when its attempt fails
        assert self.last is not None  # candidates is never empty (Table.candidates ensures it)
        raise _final(self.last[1])

    async def _try(self, c: Candidate, i: int, slot: Slot, forced: bool, more: bool) -> T | object:
        """One attempt on `c` holding `slot`: its result, or _MISS when it failed in a way that moves on."""
        backend, name = c.adapter.backend, c.route.backend
        trial = self.ejections.begin(backend)
        if trial is None and ((not forced and more) or i in self.tries):
            slot.release()
            return _MISS  # ejected, or its one trial is taken, since `pick`; or ejected by its own failure
        if self.last is not None and self.metrics is not None:
            self.metrics.retries.labels(self.last[0], self.last[1].reason).inc()
        self.tries[i] = self.tries.get(i, 0) + 1
        self.in_flight.start(name)
        started, outcome, said, held = time.monotonic(), UNDECIDED, "cancelled", False
        try:
            result = await self.attempt(c)
            outcome, said, held = SUCCESS, "ok", self.hold
            if held:
                self.in_flight.hold(self.request, name, slot)
        except GatewayError as exc:
            outcome, said = _outcome(exc), exc.reason
            if self.metrics is not None and (isinstance(exc, UpstreamError | RateLimitError) or exc.reason in REASONS):
                self.metrics.upstream_error(name, exc.reason)
            if not _fails_over(exc):
                raise
            self._failed(c, i, exc)
            return _MISS
        finally:  # a cancelled attempt (the client left) decides nothing, but frees the trial and the slot
            self.ejections.record(backend, outcome, bool(trial))
            if not held:
                slot.release()
                self.in_flight.end(name)
            self.request[OUTCOME].attempted(name, said, time.monotonic() - started)
        if self.metrics is not None:
            self.metrics.upstream.labels(name, endpoint_of(self.request)).observe(time.monotonic() - started)
        return result

    def _failed(self, c: Candidate, i: int, exc: GatewayError) -> None:
        """`c` failed with `exc` (or its queue refused): plan its retry, if it is to have one."""
        now = time.monotonic()
        delay = self.model.retry.delay(self.tries.get(i, 0), exc)
        retry_at = None if delay is None else now + delay
        limit = min(self.model.retry.budget_s, self.model.deadline_s or math.inf)
        if retry_at is not None and retry_at > self.started + limit:
            retry_at = None  # past the retry budget, or the model's deadline (gateway/deadlines.py)
        self.retry_at[i] = retry_at
        self.last = (c.route.backend, exc)
        log.warning("request %s: backend '%s' failed (%s)%s", self.request.get(REQUEST_ID), c.route.backend,
                    exc.reason, "" if retry_at is None else f"; it may be retried in {retry_at - now:.3g} s")


_MISS = object()


def _positions(todo: list[int], ordered: list[Candidate],
               picked: list[tuple[Candidate, bool]]) -> list[tuple[int, bool]]:
    """`picked` (a subsequence of the candidates at `todo`) as positions in `ordered`: a model may route to one
    backend twice (two native models), so candidates are told apart by position, not by value."""
    positions, it = [], iter(todo)
    for c, forced in picked:
        i = next(i for i in it if ordered[i] is c)
        positions.append((i, forced))
    return positions


def _refusal(refused: Refused, model: str) -> GatewayError:
    if refused.reason == FULL:
        return RateLimitError(f"The model `{model}` is at capacity: its backends' queues are full. Please retry "
                              "shortly.", retry_after=1, reason=refused.reason)
    return ServiceUnavailableError("That model is currently overloaded with other requests. You can retry your "
                                   "request.", retry_after=1, reason=refused.reason)


def _final(exc: GatewayError) -> GatewayError:
    """The error the client gets: told not to retry where no retry can help."""
    if exc.reason in FINAL and exc.should_retry is None:
        exc.should_retry = False
    return exc


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
