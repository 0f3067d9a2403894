"""Per request: admit it under every limit and budget that applies, before any backend is called, or
refuse it with a 429; when it is over, give back what it took.

Admitting takes, in order: a hit on each window counter (its cost: 1 request, the input's characters, the
measured upload's seconds), a lease on each concurrency slot, a reservation on each budget (the worst case
the request can cost). The first refusal ends it: whatever was taken is given back (hits refunded,
leases and reservations released) and the client gets OpenAI's 429, `rate_limit_exceeded` for a limit
and `insufficient_quota` for a budget, naming the limit; a shadow limit only logs and counts. When the
request is over (policy_middleware, after metering has measured it): speech seconds are counted, the
leases freed, and each reservation settled to what the request is billed, or released when it is not
billable. So concurrent requests never overshoot a budget, and only billed work is spent from it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from aiohttp import web

from gateway.auth import Identity
from gateway.config import Config
from gateway.errors import QuotaExceededError, RateLimitError
from gateway.policy.demand import Applied, Demand, applicable
from gateway.policy.rate_headers import RateHeaders, duration
from gateway.policy.rules import Budget, Limit
from gateway.policy.shared import SharedState
from gateway.policy.windows import Window
from gateway.state import ADMISSION, IDENTITY, METRICS, OUTCOME, RATE_HEADERS, SHARED_STATE, TABLE
from gateway.store import EPSILON, Store
from gateway.usage import Bill, bill

log = logging.getLogger("gateway.policy")

UNBOUNDED = 1e18
"""The limit given to a hit that counts usage after the fact (it must count whatever it is)."""


async def admit(request: web.Request, demand: Demand) -> None:
    """Take what `demand` needs under every limit and budget that applies, or raise the 429 (or, by the
    failure policy, the 503) of the first that refuses. Called by the handlers before any backend call."""
    config = request[TABLE].config
    if not config.policy.active:
        return
    identity = request[IDENTITY]
    applied = applicable(config, identity, demand)
    if not applied:
        return
    admission = request[ADMISSION] = Admission(request.app[SHARED_STATE], config, identity, demand,
                                               request.app.get(METRICS))
    try:
        await admission.take(applied)
    except RateLimitError:
        request[OUTCOME].rejected_by = admission.rejected_by
        raise
    finally:
        request[RATE_HEADERS] = admission.rate.headers()


class Admission:
    """What one request took from the store (each with the store that handed it out), and its giving back."""

    def __init__(self, shared: SharedState, config: Config, identity: Identity, demand: Demand,
                 metrics: Any) -> None:
        self.shared, self.config, self.identity, self.demand, self.metrics = shared, config, identity, demand, metrics
        self.rate = RateHeaders()
        self.admitted = False
        self.rejected_by: str | None = None
        self._hits: list[tuple[Store, str, Limit, float, float, float]] = []
        """(store, key, limit, cost, anchor, length) of each counted hit, refunded if the request is refused."""
        self._leases: list[tuple[Store, str]] = []
        self._reservations: list[tuple[Store, str, Applied]] = []
        self._renewal: asyncio.Task[None] | None = None

    async def take(self, applied: list[Applied]) -> None:
        state = self.shared.settings  # `state:` as the process started with it (it does not reload)
        now = time.time()
        limits = [a for a in applied if isinstance(a.rule, Limit)]
        for a in sorted(limits, key=lambda a: a.rule.measure == "concurrent"):  # slots after windows
            limit = a.rule
            assert isinstance(limit, Limit)
            if limit.per is None:
                await self._lease(a, limit, state.limits_on_error, state.lease_ttl_s)
            else:
                await self._hit(a, limit, now, state.limits_on_error)
        for a in applied:
            if isinstance(a.rule, Budget):
                await self._reserve(a, a.rule, now, state.budgets_on_error)
        self.admitted = True
        if self._leases:
            self._renewal = asyncio.create_task(self._renew(state.lease_ttl_s))

    async def _hit(self, a: Applied, limit: Limit, now: float, on_error: str) -> None:
        assert limit.per is not None
        cost = self.demand.cost(limit.measure) or 0.0
        anchor, length = limit.per.bounds(now)
        key = f"{a.scope}|{limit.name}"
        hit, store = await self.shared.call("limits", on_error, "hit",
                                            lambda s: s.hit(key, cost, limit.amount, length, anchor_s=anchor))
        room = hit.allowed and (limit.measure != "speech_seconds" or hit.remaining > EPSILON)
        if not room and not limit.shadow:
            self.rate.note(limit, 0.0 if limit.measure == "speech_seconds" else hit.remaining, hit.reset_s,
                           refused=True)
            used = limit.amount - hit.remaining
            raise self._refuse(a, RateLimitError(
                f"Rate limit reached for {limit.measure.replace('_', ' ')} per {limit.per.name} on "
                f"{self._whom(a)}: Limit {limit.amount:g}, Used {used:g}, Requested {cost:g}. Please try again "
                f"in {duration(hit.reset_s)}.", **_retry(hit.reset_s)))
        if not room:
            self._shadow(a)
        else:
            self._hits.append((store, key, limit, cost, anchor, length))
            if not limit.shadow:
                self.rate.note(limit, hit.remaining, hit.reset_s)

    async def _lease(self, a: Applied, limit: Limit, on_error: str, ttl: float) -> None:
        key = f"{a.scope}|concurrent"
        lease, store = await self.shared.call("limits", on_error, "acquire",
                                              lambda s: s.acquire(key, int(limit.amount), ttl))
        if lease is not None:
            self._leases.append((store, lease))
        elif limit.shadow:
            self._shadow(a)
        else:
            raise self._refuse(a, RateLimitError(
                f"Too many concurrent requests on {self._whom(a)}: Limit {limit.amount:g}. Please "
                "try again when one has finished.", retry_after=1))

    async def _reserve(self, a: Applied, budget: Budget, now: float, on_error: str) -> None:
        model = self.config.models.get(self.demand.model)
        amount = self.demand.worst_case(budget.unit, model.price if model else None)
        anchor, length = budget.period.bounds(now)
        token, store = await self.shared.call("budgets", on_error, "reserve", lambda s: s.reserve(
            f"{a.scope}|{budget.unit}", amount, budget.amount, length, anchor_s=anchor))
        if token is None:
            left = _left(budget.period, now)
            raise self._refuse(a, QuotaExceededError(
                f"You exceeded your current quota: the {budget.amount:g} {budget.unit} budget per "
                f"{budget.period.name} of {self._whom(a)} cannot cover this request. It renews in "
                f"{duration(left)}.", retry_after=math.ceil(left)))
        self._reservations.append((store, token, a))

    def _whom(self, a: Applied) -> str:
        """`key 'ci'`, `tenant 'acme'`, `tenant 'acme' for model `tts-1``: a model's limits count per tenant."""
        if a.level == "key":
            return f"key '{self.identity.key_name}'"
        return f"tenant '{self.identity.tenant}'" + (f" for model `{self.demand.model}`" if a.level == "model" else "")

    def _refuse(self, a: Applied, error: RateLimitError) -> RateLimitError:
        self.rejected_by = a.label
        log.info("refused by %s: %s", a.label, error.message)
        if self.metrics is not None:
            self.metrics.rejections.labels(self.identity.tenant, a.label).inc()
        return error

    def _shadow(self, a: Applied) -> None:
        log.info("shadow limit %s of tenant %s would have refused a request", a.label, self.identity.tenant)
        if self.metrics is not None:
            self.metrics.shadow_rejections.labels(self.identity.tenant, a.label).inc()

    async def _renew(self, ttl: float) -> None:
        while True:
            await asyncio.sleep(ttl / 3)
            for store, lease in self._leases:
                await self.shared.give_back(store, "renew", lambda s, lease=lease: s.renew(lease))

    async def free_slots(self) -> None:
        """Release the concurrency slots: as the response's last byte is about to go out (gateway/streaming.py),
        so a client that sends its next request the moment this one ended finds its slot free."""
        if self._renewal is not None:
            self._renewal.cancel()
        while self._leases:
            store, lease = self._leases.pop()
            await self.shared.give_back(store, "release_slot", lambda s, lease=lease: s.release_slot(lease))

    async def finish(self, billed: Bill) -> None:
        """Give back what the request took: counted after the fact, freed, settled or released."""
        await self.free_slots()
        give_back = self.shared.give_back
        for store, key, limit, cost, anchor, length in self._hits:
            if not self.admitted and cost:  # refused by a later limit: this one did not serve it
                await give_back(store, "hit", lambda s, k=key, lim=limit, c=cost, an=anchor, ln=length:
                                s.hit(k, -c, lim.amount, ln, anchor_s=an))
            elif limit.measure == "speech_seconds" and billed.audio_seconds > 0:
                await give_back(store, "hit", lambda s, k=key, an=anchor, ln=length:
                                s.hit(k, billed.audio_seconds, UNBOUNDED, ln, anchor_s=an))
        for store, token, a in self._reservations:
            assert isinstance(a.rule, Budget)
            if self.admitted and billed.billable:
                actual = _actual(a.rule.unit, billed)
                await give_back(store, "settle", lambda s, t=token, x=actual: s.settle(t, x))
            else:
                await give_back(store, "release", lambda s, t=token: s.release(t))
            if a.level == "tenant" and self.metrics is not None:
                self._report_remaining(store, a, a.rule)

    def _report_remaining(self, store: Store, a: Applied, budget: Budget) -> None:
        """gateway_budget_remaining, read back in the background (SharedState.read_soon): a round trip
        the request need not wait for, shared by the requests that finish meanwhile."""
        gauge, key = self.metrics.budget_remaining.labels(self.identity.tenant), f"{a.scope}|{budget.unit}"

        async def read(s: Store) -> None:
            anchor, length = budget.period.bounds(time.time())
            gauge.set(max(0.0, budget.amount - await s.spent(key, length, anchor_s=anchor)))

        self.shared.read_soon(store, key, "spent", read)


def _actual(unit: str, billed: Bill) -> float:
    if unit == "usd":
        return billed.cost_usd or 0.0
    return float(billed.characters) if unit == "characters" else billed.audio_seconds


def _left(window: Window, now: float) -> float:
    """Seconds until the window that holds `now` ends."""
    anchor, length = window.bounds(now)
    return length - (now - anchor) % length


def _retry(reset_s: float) -> dict[str, Any]:
    """Retry-After for a window's refusal; a wait past a minute is not worth the SDK's automatic retries."""
    return {"retry_after": math.ceil(reset_s), "should_retry": False if reset_s > 60 else None}


@web.middleware
async def policy_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Gives back what the request's admission took, once it is over (outside metering, which measures
    the speech it sent). Shielded: a client that went away cannot skip it."""
    try:
        response = await handler(request)
        request[OUTCOME].sent(response)
        return response
    finally:
        admission = request.get(ADMISSION)
        if admission is not None:
            outcome = request[OUTCOME]
            model = admission.config.models.get(outcome.public_model or "")
            billed = bill(outcome, outcome.status or 499, model.price if model else None)
            await asyncio.shield(admission.finish(billed))


async def free_slots(request: web.Request) -> None:
    """The request's concurrency slots back, if it holds any (see Admission.free_slots)."""
    admission = request.get(ADMISSION)
    if admission is not None:
        await admission.free_slots()


async def add_rate_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the x-ratelimit-* headers of the request's limits, on success and refusal."""
    headers = request.get(RATE_HEADERS)
    if headers:
        response.headers.update(headers)
