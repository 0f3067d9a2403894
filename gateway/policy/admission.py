"""Per request: admit it under every limit and budget that applies, before any backend is called, or
refuse it with a 429; when it is over, give back what it took.

Admitting is one `take` from the store (one round trip, atomic): in order, a hit on each window counter
(its cost: 1 request, the input's characters, the measured upload's seconds), a lease on each concurrency
slot, a reservation on each budget (the worst case the request can cost). If any of them does not fit,
nothing is taken, so a refused request never holds what a concurrent one needs; the client gets OpenAI's
429 for the first that refused, `rate_limit_exceeded` for a limit and `insufficient_quota` for a budget,
naming the limit; a shadow limit's step is optional: it only logs and counts. When the request is over
(policy_middleware, after metering has measured it), one `give`: speech seconds are counted, the leases
freed (already, as its last byte went out), and each reservation settled to what the request is billed,
or released when it is not billable. So concurrent requests never overshoot a budget, and only billed
work is spent from it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
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
from gateway.store import EPSILON, Hit, Store
from gateway.store.batch import AcquireAsk, Ask, Count, Give, HitAsk, Release, ReleaseSlot, ReserveAsk, Settle
from gateway.usage import Bill, bill

log = logging.getLogger("gateway.policy")


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
    """What one request took from the store (and the store that handed it out), and its giving back."""

    def __init__(self, shared: SharedState, config: Config, identity: Identity, demand: Demand,
                 metrics: Any) -> None:
        self.shared, self.config, self.identity, self.demand, self.metrics = shared, config, identity, demand, metrics
        self.rate = RateHeaders()
        self.admitted = False
        self.rejected_by: str | None = None
        self._store: Store | None = None
        self._counted: list[tuple[str, float, float]] = []
        """(key, anchor, length) of each speech_seconds window that admitted it: counted once it is over."""
        self._leases: list[str] = []
        self._reservations: list[tuple[str, Applied]] = []
        self._renewal: asyncio.Task[None] | None = None

    async def take(self, applied: list[Applied]) -> None:
        """One `take` of every step: a hit per window, then a lease per concurrency slot, then a reservation
        per budget, all or nothing (a shadow limit's step is optional). A refusal names the first step
        that refused, in that order."""
        state = self.shared.settings  # `state:` as the process started with it (it does not reload)
        now = time.time()
        limits = [a for a in applied if isinstance(a.rule, Limit)]
        steps = sorted(limits, key=lambda a: a.rule.per is None)  # slots after windows
        steps += [a for a in applied if isinstance(a.rule, Budget)]
        asks = [self._ask(a, now, state.lease_ttl_s) for a in steps]
        policies: dict[str, str] = {}
        if limits:
            policies["limits"] = state.limits_on_error
        if len(steps) > len(limits):
            policies["budgets"] = state.budgets_on_error
        taken, self._store = await self.shared.call(policies, "take", lambda s: s.take(asks))
        for i, (a, ask, got) in enumerate(zip(steps, asks, taken.results, strict=True)):
            if i not in taken.refused:
                self._took(a, ask, got, taken.admitted)
            elif not ask.required:
                self._shadow(a)
            else:
                raise self._refusal(a, ask, got, now)
        self.admitted = True
        if self._leases:
            self._renewal = asyncio.create_task(self._renew())

    def _ask(self, a: Applied, now: float, lease_ttl_s: float) -> Ask:
        rule = a.rule
        if isinstance(rule, Budget):
            model = self.config.models.get(self.demand.model)
            amount = self.demand.worst_case(rule.unit, model.price if model else None)
            anchor, length = rule.period.bounds(now)
            return ReserveAsk(f"{a.scope}|{rule.unit}", amount, rule.amount, length, anchor)
        if rule.per is None:
            return AcquireAsk(f"{a.scope}|{rule.measure}", int(rule.amount), lease_ttl_s, required=not rule.shadow)
        anchor, length = rule.per.bounds(now)
        # speech_seconds costs nothing now (counted once it is over) and needs room left: more than EPSILON
        ceiling = rule.amount - 2 * EPSILON if rule.measure == "speech_seconds" else rule.amount
        return HitAsk(f"{a.scope}|{rule.name}", self.demand.cost(rule.measure) or 0.0, ceiling, length, anchor,
                      required=not rule.shadow)

    def _took(self, a: Applied, ask: Ask, got: Hit | str | None, admitted: bool) -> None:
        """A step that fit: its rate headers, and (when the batch was admitted) what it took."""
        if isinstance(ask, HitAsk):
            limit = a.rule
            assert isinstance(limit, Limit) and isinstance(got, Hit)
            if not limit.shadow:  # (a refused batch's hit says what is left now: nothing was counted)
                self.rate.note(limit, _left_of(limit, ask, got), got.reset_s)
            if admitted and limit.measure == "speech_seconds":
                self._counted.append((ask.key, ask.anchor_s, ask.window_s))
        elif admitted and isinstance(ask, AcquireAsk):
            assert isinstance(got, str)
            self._leases.append(got)
        elif admitted:
            assert isinstance(got, str)
            self._reservations.append((got, a))

    def _refusal(self, a: Applied, ask: Ask, got: Hit | str | None, now: float) -> RateLimitError:
        rule = a.rule
        if isinstance(rule, Budget):
            left = _left(rule.period, now)
            return self._refuse(a, QuotaExceededError(
                f"You exceeded your current quota: the {rule.amount:g} {rule.unit} budget per "
                f"{rule.period.name} of {self._whom(a)} cannot cover this request. It renews in "
                f"{duration(left)}.", retry_after=math.ceil(left)))
        if rule.per is None:
            what = "realtime sessions" if rule.measure == "sessions" else "concurrent requests"
            return self._refuse(a, RateLimitError(
                f"Too many {what} on {self._whom(a)}: Limit {rule.amount:g}. Please "
                "try again when one has finished.", retry_after=1))
        assert isinstance(ask, HitAsk) and isinstance(got, Hit)
        remaining = 0.0 if rule.measure == "speech_seconds" else got.remaining
        self.rate.note(rule, remaining, got.reset_s, refused=True)
        used = rule.amount - _left_of(rule, ask, got)
        return self._refuse(a, RateLimitError(
            f"Rate limit reached for {rule.measure.replace('_', ' ')} per {rule.per.name} on "
            f"{self._whom(a)}: Limit {rule.amount:g}, Used {used:g}, Requested {ask.cost:g}. Please try "
            f"again in {duration(got.reset_s)}.", **_retry(got.reset_s)))

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

    async def _renew(self) -> None:
        ttl = self.shared.settings.lease_ttl_s
        while True:
            await asyncio.sleep(ttl / 3)
            for lease in self._leases:
                await self._give_back("renew", lambda s, lease=lease: s.renew(lease))

    async def _give_back(self, op: str, run: Callable[[Store], Awaitable[object]]) -> None:
        assert self._store is not None
        await self.shared.give_back(self._store, op, run)

    async def free_slots(self) -> None:
        """Release the concurrency slots: as the response's last byte is about to go out (gateway/streaming.py),
        so a client that sends its next request the moment this one ended finds its slot free."""
        if self._renewal is not None:
            self._renewal.cancel()
        if self._leases:
            freed, self._leases = [ReleaseSlot(lease) for lease in self._leases], []
            await self._give_back("give", lambda s: s.give(freed))

    async def finish(self, billed: Bill) -> None:
        """Give back what the request took, in one `give`: speech seconds counted after the fact, slots
        freed (if free_slots has not yet), reservations settled to what it is billed or released."""
        if self._renewal is not None:
            self._renewal.cancel()
        items: list[Give] = [ReleaseSlot(lease) for lease in self._leases]
        self._leases = []
        if billed.audio_seconds > 0:
            items += [Count(key, billed.audio_seconds, length, anchor) for key, anchor, length in self._counted]
        for token, a in self._reservations:
            assert isinstance(a.rule, Budget)
            items.append(Settle(token, _actual(a.rule.unit, billed)) if billed.billable else Release(token))
        if not items or self._store is None:
            return
        await self._give_back("give", lambda s: s.give(items))
        if self.metrics is not None:
            for _, a in self._reservations:
                if a.level == "tenant":
                    assert isinstance(a.rule, Budget)
                    self._report_remaining(self._store, a, a.rule)

    def _report_remaining(self, store: Store, a: Applied, budget: Budget) -> None:
        """gateway_budget_remaining, read back in the background (SharedState.read_soon): a round trip
        the request need not wait for, shared by the requests that finish meanwhile."""
        gauge, key = self.metrics.budget_remaining.labels(self.identity.tenant), f"{a.scope}|{budget.unit}"

        async def read(s: Store) -> None:
            anchor, length = budget.period.bounds(time.time())
            gauge.set(max(0.0, budget.amount - await s.spent(key, length, anchor_s=anchor)))

        self.shared.read_soon(store, key, "spent", read)


def _left_of(limit: Limit, ask: HitAsk, hit: Hit) -> float:
    """What is left of `limit` by `hit`, whose ceiling is EPSILONs lower for speech seconds (see _ask)."""
    if ask.limit == limit.amount:
        return hit.remaining
    return min(limit.amount, round(hit.remaining + limit.amount - ask.limit, 9))


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
