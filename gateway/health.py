"""Backend health, probed in the background and kept in memory, so that /readyz never waits on a backend.

Readiness means "config loaded and not draining": one slow or broken engine must not take every pod
out of the Service at once (Envoy keeps upstream health checking apart from readiness the same way).
A background task probes every backend of the current table each `server.probe_interval_s`, each
probe bounded by `server.probe_timeout_s` (independent of the backend's request timeouts), and
records up/down with the time of the probe; `gateway_backend_up` follows it. After a reload the new
table is probed at once, as is every backend when a supervised engine changes state
(gateway/engine_process.py). A backend whose settings changed, or that was never probed, is "unknown".
A failed probe also counts as a failure towards the backend's outlier ejection (gateway/ejection.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from gateway.adapters.base import Adapter
from gateway.config import Backend
from gateway.ejection import FAILURE, Ejections
from gateway.metering import Metrics
from gateway.state import CONFIG, EJECTIONS, HEALTH, METRICS, TABLES
from gateway.table import Table, TableHolder

log = logging.getLogger("gateway.health")


@dataclass(frozen=True, slots=True)
class Probe:
    """One backend's last probe: for which settings, its answer, and when (time.monotonic())."""

    backend: Backend
    up: bool
    at: float


class Health:
    """The last probe of each backend, and the task that refreshes them."""

    def __init__(self, tables: TableHolder, timeout: float, metrics: Metrics | None = None,
                 ejections: Ejections | None = None) -> None:
        self.tables = tables
        self.ejections = ejections
        """Fed each failed probe (gateway/ejection.py: a success does not end an ejection early)."""
        self.timeout = timeout
        self.metrics = metrics
        self._probes: dict[str, Probe] = {}

    def state(self, table: Table) -> dict[str, tuple[str, float | None]]:
        """backend name -> ("up" | "down" | "unknown", seconds since its last probe or None), for `table`."""
        now = time.monotonic()
        found: dict[str, tuple[str, float | None]] = {}
        for name, backend in table.config.backends.items():
            probe = self._probes.get(name)
            if probe is None or probe.backend != backend:
                found[name] = ("unknown", None)
            else:
                found[name] = ("up" if probe.up else "down", round(now - probe.at, 3))
        return found

    async def probe(self) -> None:
        """Probe every backend of the current table now, concurrently; each result is kept as it arrives."""
        table = self.tables.current
        self._forget(table)
        await asyncio.gather(*(self._probe(table.config.backends[n], a) for n, a in table.adapters.items()))

    async def _probe(self, backend: Backend, adapter: Adapter) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                up = bool(await adapter.ready())
        except TimeoutError:
            up = False
        except Exception:  # a probe must never end the prober; the backend is simply not up
            log.exception("backend %s: readiness probe failed", backend.name)
            up = False
        if self.tables.current.config.backends.get(backend.name) != backend:
            return  # reloaded meanwhile: this answer is about settings no longer served
        if not up and self.ejections is not None:
            self.ejections.record(backend, FAILURE, probe=True)
        before = self._probes.get(backend.name)
        if before is not None and before.backend == backend and before.up != up:
            log.warning("backend %s is %s", backend.name, "up" if up else "down")
        self._probes[backend.name] = Probe(backend, up, time.monotonic())
        if self.metrics is not None:
            self.metrics.view.backends[backend.name] = up

    def _forget(self, table: Table) -> None:
        """Drop what is known of backends the table no longer has (their gauge too)."""
        for name in [n for n in self._probes if n not in table.config.backends]:
            del self._probes[name]
            if self.metrics is not None:
                self.metrics.view.backends.pop(name, None)

    async def run(self, interval: float) -> None:
        """Probe now, then every `interval` seconds, and at once after a reload swaps the table."""
        changed = self.tables.changed
        while True:
            changed.clear()
            await self.probe()
            try:
                await asyncio.wait_for(changed.wait(), interval)
            except TimeoutError:
                pass




async def health_ctx(app: web.Application) -> AsyncIterator[None]:
    """The prober, from startup (after the backends) to shutdown. `probe_interval_s: 0`: no probing."""
    server = app[CONFIG].server
    health = app[HEALTH] = Health(app[TABLES], server.probe_timeout_s, app.get(METRICS), app.get(EJECTIONS))
    task = None
    if server.probe_interval_s > 0:
        task = asyncio.get_running_loop().create_task(health.run(server.probe_interval_s), name="health-prober")
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
