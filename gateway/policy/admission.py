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
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.auth import Identity
from gateway.config import Config, Price
from gateway.errors import QuotaExceededError, RateLimitError
from gateway.policy.rate_headers import RateHeaders, duration
from gateway.policy.rules import Budget, Limit
from gateway.policy.shared import SharedState
from gateway.policy.windows import Window
from gateway.state import ADMISSION, IDENTITY, METRICS, OUTCOME, RATE_HEADERS, SHARED_STATE, TABLE
from gateway.store import EPSILON, Store
from gateway.usage import Bill, bill

log = logging.getLogger("gateway.policy")

SPEECH_SECONDS_PER_CHARACTER = 0.2
"""Worst case of speech audio per input character at speed 1 (speech runs about 15 characters a second,
0.07 s each): what a speech request reserves of a `seconds` budget or of a price per audio minute."""
TRANSCRIPT_CHARACTERS_PER_SECOND = 50.0
"""Worst case of transcript text per second of audio (fast speech is about 20): what a transcription
reserves of a `characters` budget or of a price per million characters."""
UNBOUNDED = 1e18
"""The limit given to a hit that counts usage after the fact (it must count whatever it is)."""


@dataclass(frozen=True, slots=True)
class Demand:
    """What a request asks for, known before any backend is called."""

    model: str
    speech: bool
    characters: int = 0
    audio_seconds: float = 0.0
    speed: float = 1.0

    def cost(self, measure: str) -> float | None:
        """What it costs a limit of `measure`, or None when that limit does not apply to it."""
        if measure in ("requests", "concurrent"):
            return 1.0
        if measure == "characters":
            return float(self.characters) if self.speech else None
        if measure == "audio_seconds":
            return None if self.speech else self.audio_seconds
        return 0.0 if self.speech else None  # speech_seconds: room checked now, counted once it is over

    def worst_case(self, unit: str, price: Price | None) -> float:
        if self.speech:
            characters, seconds = float(self.characters), self.characters * SPEECH_SECONDS_PER_CHARACTER / self.speed
        else:
            characters, seconds = self.audio_seconds * TRANSCRIPT_CHARACTERS_PER_SECOND, self.audio_seconds
        if unit == "characters":
            return characters
        if unit == "seconds":
            return seconds
        return 0.0 if price is None else price.cost(characters, seconds)


@dataclass(frozen=True, slots=True)
class Applied:
    """A limit or a budget as it applies to one request: its level and the scope it is counted in."""

    level: str
    scope: str
    rule: Limit | Budget

    @property
    def label(self) -> str:
        """`key:requests/minute`, `tenant:budget/month`: the metrics' `limit` and the ledger's `rejected_by`."""
        if isinstance(self.rule, Budget):
            return f"{self.level}:budget/{self.rule.period.name}"
        return f"{self.level}:{self.rule.name}"


def applicable(config: Config, identity: Identity, demand: Demand) -> list[Applied]:
    """Every limit and budget on this request: its key's, its tenant's, and its tenant's on the model
    (each level's own, else the level's default)."""
    policy, tenant_name = config.policy, identity.tenant
    tenant = policy.tenants.get(tenant_name)
    key_limits = identity.rules.limits
    tenant_limits = tenant.rules.limits if tenant is not None else None
    model_limits = tenant.models.get(demand.model) if tenant is not None else None
    if model_limits is None and demand.model in config.models:
        model_limits = config.models[demand.model].limits
    levels = (
        ("key", f"key:{identity.key_name}", policy.defaults.get("key", ()) if key_limits is None else key_limits),
        ("tenant", f"tenant:{tenant_name}", policy.defaults.get("tenant", ()) if tenant_limits is None
         else tenant_limits),
        ("model", f"model:{len(tenant_name)}:{tenant_name}:{demand.model}",
         policy.defaults.get("model", ()) if model_limits is None else model_limits),
    )
    applied = [Applied(level, scope, limit) for level, scope, limits in levels for limit in limits
               if demand.cost(limit.measure) is not None]
    if identity.rules.budget is not None:
        applied.append(Applied("key", f"key:{identity.key_name}", identity.rules.budget))
    if tenant is not None and tenant.rules.budget is not None:
        applied.append(Applied("tenant", f"tenant:{tenant_name}", tenant.rules.budget))
    return applied


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
