"""The configured state store behind its failure policy. Each call names the features it serves
(`limits`, `budgets`) and the policy the request's config sets for each: when the store fails, `open`
runs the call on this process's own memory store instead (limits per process until the store is back)
and `closed` answers 503. After FAILURES_IN_A_ROW failures the store is not tried again for
`state.retry_s`, so while it is down no request waits out its timeout (and afterwards one failure is
enough to leave it alone again), while one slow answer in a busy second does not turn a whole second
away. Every call is timed, every failure and fallback counted and logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from gateway.errors import ServiceUnavailableError
from gateway.metering import Metrics
from gateway.policy.rules import Policy, StateSettings
from gateway.store import Clock, Store, StoreUnavailable, open_store
from gateway.store.memory import MemoryStore

log = logging.getLogger("gateway.policy")
T = TypeVar("T")
Read = Callable[[Store], Awaitable[object]]
FAILURES_IN_A_ROW = 3


class SharedState:
    def __init__(self, settings: StateSettings, metrics: Metrics | None, clock: Clock | None = None) -> None:
        self.settings = settings
        self.store = open_store(settings.store, clock)
        self.local: Store = self.store if settings.store.backend == "memory" else MemoryStore(clock or time.time)
        """The fallback: this process's memory."""
        self._metrics = metrics
        self._down_until = 0.0
        self._failures = 0
        """Calls failed in a row; reset by the first that succeeds."""
        self._reads: dict[tuple[Store, str], Read | None] = {}
        """The background reads under way (see `read_soon`), each with the one asked for meanwhile."""
        self._tasks: set[asyncio.Task[None]] = set()

    async def call(self, policies: Mapping[str, str], op: str,
                   run: Callable[[Store], Awaitable[T]]) -> tuple[T, Store]:
        """`run` on the store, or by the failure policy of the features it serves (`policies`: feature ->
        `open` or `closed`, as the request's config sets them). When the store fails and any of them is
        closed, 503; else `run` goes to the memory fallback whole (one request's admission is one `take`,
        so its steps all count in one place). Each feature present is counted with what happened to it.
        The store it ran on comes back with its result, so that whatever it handed out (a lease, a
        reservation) is given back to the same one."""
        closed = [feature for feature, on_error in policies.items() if on_error != "open"]
        if time.monotonic() >= self._down_until:
            try:
                result = await self.timed(op, run(self.store))
                self._failures = 0
                return result, self.store
            except StoreUnavailable as exc:
                self._failures += 1
                skipped = self._failures >= FAILURES_IN_A_ROW
                if skipped:
                    self._down_until = time.monotonic() + self.settings.retry_s
                log.warning("state store failed (%s): %s per the failure policy%s", exc,
                            "refusing requests" if closed else "counting in this process's memory",
                            f", and not tried for {self.settings.retry_s} s" if skipped else "")
        if self._metrics is not None:
            for feature in policies:
                self._metrics.state_fallbacks.labels(feature, "refused" if closed else "memory").inc()
        if closed:
            raise ServiceUnavailableError(f"The gateway cannot check {' and '.join(closed)} right now. Please "
                                          "retry shortly.", retry_after=max(1, round(self.settings.retry_s)),
                                          code="state_unavailable")
        return await run(self.local), self.local

    async def timed(self, op: str, call: Awaitable[T]) -> T:
        """Await one store operation, timing it; a failure is counted under `op` and raised again. Whatever
        the backend's own timeouts, no operation is waited for longer than 4 x `state.timeout_s` (at least
        1 s): a SQLite file on a hung disk must not hang the requests."""
        started = time.perf_counter()
        try:
            try:
                async with asyncio.timeout(max(1.0, 4 * self.settings.store.timeout_s)):
                    result = await call
            except TimeoutError:
                raise StoreUnavailable(f"{self.settings.store.backend} state store: no answer in time") from None
        except StoreUnavailable:
            if self._metrics is not None:
                self._metrics.state_errors.labels(op).inc()
            raise
        if self._metrics is not None:
            self._metrics.state_seconds.labels(op).observe(time.perf_counter() - started)
        return result

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.close()

    async def give_back(self, store: Store, op: str, run: Callable[[Store], Awaitable[object]]) -> None:
        """Settle, release or refund on the store that handed it out. The request is over by then, so a
        failure is logged and counted, not raised: an unsettled reservation stays counted (the safe side)
        until its period ends, an unreleased lease until its TTL."""
        try:
            await (self.timed(op, run(store)) if store is self.store else run(store))
        except StoreUnavailable as exc:
            log.warning("state store failed on %s (%s); it stays counted until it expires", op, exc)

    def read_soon(self, store: Store, key: str, op: str, run: Read) -> None:
        """Run `run`, a read that only feeds a gauge, off the request's path and one at a time per `key`:
        asked for while one is under way, the latest asked for runs once that one is done. So no request
        waits a round trip for it, requests finishing together share one, and the last read starts after
        the last change."""
        if (store, key) in self._reads:
            self._reads[store, key] = run
            return
        self._reads[store, key] = None
        task = asyncio.get_running_loop().create_task(self._read(store, key, op, run))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read(self, store: Store, key: str, op: str, run: Read | None) -> None:
        try:
            while run is not None:
                await self.give_back(store, op, run)
                run, self._reads[store, key] = self._reads[store, key], None
        finally:
            del self._reads[store, key]


def scope_warnings(policy: Policy, workers: int | None, environ: Mapping[str, str], slots: bool = False) -> list[str]:
    """The "limit x replicas" trap, said at start (`workers`: how many serve) and by check-config (None):
    a store that is not shared by every process counting lets each count the whole limit. `slots`: some
    backend has a max_concurrency (gateway/capacity.py), counted in the same store."""
    backend = policy.state.store.backend
    if not (policy.active or slots) or backend == "redis":
        return []
    counted = ("limits, budgets and max_concurrency slots" if policy.active and slots
               else "limits and budgets" if policy.active else "max_concurrency slots")
    warnings = []
    if backend == "memory" and (workers is None or workers > 1):
        served = "each worker process" if workers else "each process"
        warnings.append(f"state.backend: memory: {counted} are counted by {served} on its own, so "
                        "several workers or replicas let through that many times the limit; use sqlite (one "
                        "host) or redis (several replicas)")
    if "KUBERNETES_SERVICE_HOST" in environ:
        warnings.append(f"state.backend: {backend} in Kubernetes: {counted} are counted per pod; with "
                        "more than one replica (the HPA runs 2 to 10) use redis")
    return warnings
