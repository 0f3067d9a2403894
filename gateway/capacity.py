"""Admission control per backend: at most `max_concurrency` attempts in flight to it, a bounded queue in front.

Slots are counted where the state store counts (gateway/store/): leased from it under the scope
`backend:<name>` when `state.backend` is `sqlite` (every worker of a host) or `redis` (every replica), so
the limit holds for all of them together; in this process's memory when it is `memory`. When the store
fails, slots are counted in this process's memory until it is back (as limits with `on_error: open`): an
engine's protection degrades to per process rather than refusing its traffic. A leased slot is renewed while
its attempt runs (every third of `state.lease_ttl_s`), so a crashed process's slots come back within it.

The queue is this process's: requests waiting for a slot of one backend, ordered by their key's or tenant's
`queue_priority` (high, normal, low), then by arrival. Only its head asks for a slot: at once when a slot
of this process is freed, and every POLL_S while slots are counted in the store (a slot freed by another
process is not announced). A request arriving while others wait joins the queue behind them rather than
taking a slot first. A request leaves the queue with a slot, on `queue_timeout_s`, or at once when its
client goes away (aiohttp cancels the handler, and with it the wait).

A slot's life is its attempt's: freed when the attempt fails, else held until the request is over (a
stream's last byte included), as gateway/balance.py's in-flight count (`InFlight.hold`).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
from dataclasses import dataclass, field

from gateway.auth import Identity
from gateway.metering import Metrics
from gateway.policy.rules import QUEUE_PRIORITIES, Policy
from gateway.policy.shared import SharedState
from gateway.settings import Capacity
from gateway.store import Store
from gateway.table import TableHolder

log = logging.getLogger("gateway.capacity")
POLL_S = 0.05
"""How often the head of a queue asks the state store for a slot freed by another process."""
FULL, TIMEOUT = "queue_full", "queue_timeout"


class Refused(Exception):
    """No slot: the queue was full (`FULL`) or the wait timed out (`TIMEOUT`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def rank(identity: Identity, policy: Policy) -> int:
    """A request's place in queues: its key's `queue_priority`, else its tenant's, else normal."""
    tenant = policy.tenants.get(identity.tenant)
    priority = identity.rules.queue_priority or (tenant.rules.queue_priority if tenant else None) or "normal"
    return QUEUE_PRIORITIES.index(priority)


@dataclass(eq=False, slots=True)
class Slot:
    """One attempt's place at a backend; `release` is idempotent."""

    gate: Gate | None
    lease: str | None = None
    store: Store | None = None

    def release(self) -> None:
        gate, self.gate = self.gate, None
        if gate is not None:
            gate.release(self)


FREE = Slot(None)
"""The slot of a backend without max_concurrency: nothing to count."""


@dataclass(order=True, slots=True)
class _Waiter:
    rank: int
    seq: int
    woken: asyncio.Event = field(compare=False, default_factory=asyncio.Event)


class Gate:
    """One backend's slots held by this process and its queue."""

    def __init__(self, gates: Gates, name: str) -> None:
        self.gates, self.name = gates, name
        self.held = 0
        self.queue: list[_Waiter] = []

    async def take(self, capacity: Capacity) -> Slot | None:
        """A slot now, or None: all taken."""
        limit = capacity.max_concurrency or 0
        shared = self.gates.shared
        if shared is None or not self.gates.shared_slots:
            if self.held >= limit:
                return None
            self.held += 1
            return Slot(self)
        ttl = shared.settings.lease_ttl_s
        lease, store = await shared.call({"backends": "open"}, "acquire",
                                         lambda s: s.acquire(f"backend:{self.name}", limit, ttl))
        if lease is None:
            return None
        self.held += 1
        slot = Slot(self, lease, store)
        self.gates.leased.add(slot)
        self.gates.renew_soon()
        return slot

    async def wait(self, capacity: Capacity, rank: int) -> Slot:
        """A slot once one is free and this request is the head of the queue; Refused otherwise."""
        if len(self.queue) >= capacity.max_queue:
            self.gates.count_full(self.name)
            raise Refused(FULL)
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + capacity.queue_timeout_s
        me = _Waiter(rank, next(self.gates.seq))
        bisect.insort(self.queue, me)
        self.gates.depth(self.name, +1)
        outcome = "left"
        try:
            while True:
                me.woken.clear()
                if self.queue[0] is me and (slot := await self.take(capacity)) is not None:
                    outcome = "admitted"
                    return slot
                left = deadline - loop.time()
                if left <= 0:
                    outcome = "timeout"
                    raise Refused(TIMEOUT)
                polls = self.queue[0] is me and self.gates.shared_slots
                try:
                    async with asyncio.timeout(min(left, POLL_S) if polls else left):
                        await me.woken.wait()
                except TimeoutError:
                    pass
        finally:
            head = self.queue[0] is me
            self.queue.remove(me)
            if head and self.queue and (outcome != "admitted" or self.held < (capacity.max_concurrency or 0)):
                self.queue[0].woken.set()  # the next may take a slot too (in a shared store it polls anyway)
            self.gates.depth(self.name, -1)
            self.gates.waited(self.name, outcome, loop.time() - started)

    def release(self, slot: Slot) -> None:
        self.held -= 1
        if slot.lease is None:
            self._wake()
            return
        self.gates.leased.discard(slot)
        self.gates.spawn(self._give_back(slot))

    async def _give_back(self, slot: Slot) -> None:
        shared = self.gates.shared
        assert shared is not None and slot.store is not None and slot.lease is not None
        lease = slot.lease
        await shared.give_back(slot.store, "release", lambda s: s.release_slot(lease))
        self._wake()

    def _wake(self) -> None:
        if self.queue:
            self.queue[0].woken.set()


class Gates:
    """Every backend's gate in this process, read by each request's routing (gateway/handlers/routing.py)."""

    def __init__(self, tables: TableHolder, metrics: Metrics | None = None) -> None:
        self.tables = tables
        self.metrics = metrics
        self.shared: SharedState | None = None
        """Set once the state store is open (lifecycle's shared_state_ctx); until then, memory."""
        self.seq = itertools.count()
        self.leased: set[Slot] = set()
        self._gates: dict[str, Gate] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._renewal: asyncio.Task[None] | None = None

    @property
    def shared_slots(self) -> bool:
        return self.shared is not None and self.shared.settings.store.backend != "memory"

    def capacity(self, backend: str) -> Capacity | None:
        """`backend`'s admission settings, or None: it has no max_concurrency."""
        capacity = self.tables.current.config.capacity.get(backend)
        return capacity if capacity is not None and capacity.max_concurrency else None

    def gate(self, backend: str) -> Gate:
        gate = self._gates.get(backend)
        if gate is None:
            gate = self._gates[backend] = Gate(self, backend)
        return gate

    async def enter(self, backend: str) -> Slot | None:
        """A slot at `backend` now (FREE when it has no limit), or None: none free, or others wait for one."""
        capacity = self.capacity(backend)
        if capacity is None:
            return FREE
        gate = self.gate(backend)
        return None if gate.queue else await gate.take(capacity)

    async def wait(self, backend: str, rank: int) -> Slot:
        """A slot at `backend` after waiting in its queue; Refused when full or timed out."""
        capacity = self.capacity(backend)
        if capacity is None:
            return FREE
        return await self.gate(backend).wait(capacity, rank)

    def spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def renew_soon(self) -> None:
        if self._renewal is None or self._renewal.done():
            self._renewal = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        """Renew every leased slot every third of the lease's TTL, while any is held."""
        assert self.shared is not None
        while self.leased:
            await asyncio.sleep(self.shared.settings.lease_ttl_s / 3)
            for slot in list(self.leased):
                if slot.store is not None and slot.lease is not None:
                    lease = slot.lease
                    await self.shared.give_back(slot.store, "renew", lambda s, lease=lease: s.renew(lease))

    async def close(self) -> None:
        """Stop renewing; let the slots being given back reach the store (each bounded by its timeout)."""
        if self._renewal is not None:
            self._renewal.cancel()
        await asyncio.gather(*self._tasks, *([self._renewal] if self._renewal else []), return_exceptions=True)

    def depth(self, backend: str, change: int) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(backend).inc(change)

    def waited(self, backend: str, outcome: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.queue_wait.labels(backend, outcome).observe(seconds)
        if outcome == "timeout":
            log.warning("backend %s: a request waited %.3g s for a slot and timed out", backend, seconds)

    def count_full(self, backend: str) -> None:
        if self.metrics is not None:
            self.metrics.queue_full.labels(backend).inc()
