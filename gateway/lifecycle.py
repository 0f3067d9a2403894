"""App-wide state and its paired startup/cleanup: the backends' connection pools, the adapters, draining."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable

from aiohttp import web

from gateway.adapters import build_adapters
from gateway.adapters.base import Adapter
from gateway.audio.workers import AudioWorkers
from gateway.config import Config
from gateway.ledger import LedgerWriter
from gateway.mapping import Table
from gateway.metering import LEDGER, METRICS, Metrics, metrics_handler
from gateway.upstreams import Upstreams

log = logging.getLogger("gateway.lifecycle")


class TableHolder:
    """The current mapping-table snapshot. A reload swaps it whole; each request pins the snapshot it
    started with. Snapshots share the adapters of unchanged backends, so an adapter is closed only
    once no live snapshot (the current one, or a replaced one still serving a request) holds it."""

    def __init__(self, upstreams: Upstreams) -> None:
        self.upstreams = upstreams
        """The adapters' connection pools, each closed with its adapter."""
        self._current: Table | None = None
        self._pins: dict[int, int] = {}
        self._retired: dict[int, Table] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self.idle = asyncio.Event()
        """Set while no request is being served."""
        self.idle.set()
        self.changed = asyncio.Event()
        """Set by each swap (a reload), so that the health prober probes the new table at once."""

    @property
    def current(self) -> Table:
        if self._current is None:
            raise RuntimeError("the gateway has not started")
        return self._current

    @property
    def serving(self) -> bool:
        """A snapshot is loaded: after startup and before shutdown."""
        return self._current is not None

    @property
    def in_flight(self) -> int:
        """Requests being served, on any snapshot."""
        return sum(self._pins.values())

    def pin(self) -> Table:
        table = self.current
        self._pins[id(table)] = self._pins.get(id(table), 0) + 1
        self.idle.clear()
        return table

    def unpin(self, table: Table) -> None:
        left = self._pins[id(table)] = self._pins[id(table)] - 1
        if left == 0:
            del self._pins[id(table)]
            if id(table) in self._retired:
                self._release(self._retired.pop(id(table)))
            if not self._pins:
                self.idle.set()

    def swap(self, table: Table) -> None:
        old, self._current = self._current, table
        self.changed.set()
        if old is None:
            return
        if self._pins.get(id(old)):
            self._retired[id(old)] = old
        else:
            self._release(old)

    def _release(self, table: Table) -> None:
        """`table` serves nothing any more: close those of its adapters no live snapshot holds."""
        live = {id(a) for t in (self._current, *self._retired.values()) if t for a in t.adapters.values()}
        orphans = [a for a in table.adapters.values() if id(a) not in live]
        if orphans:
            task = asyncio.get_running_loop().create_task(close_adapters(orphans, self.upstreams))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """Close every snapshot's adapters (each once): the current one, retired ones, those being closed."""
        tables = [*self._retired.values(), *([self._current] if self._current else [])]
        self._retired.clear()
        self._current = None
        await close_adapters(list({id(a): a for t in tables for a in t.adapters.values()}.values()),
                             self.upstreams)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        await self.upstreams.aclose()


async def close_adapters(adapters: Iterable[Adapter], upstreams: Upstreams) -> None:
    """Close each adapter, then its connection pool."""
    for adapter in adapters:
        try:
            await adapter.aclose()
        except Exception:
            log.exception("closing an adapter failed")
        await upstreams.close(adapter)


CONFIG = web.AppKey("config", Config)
"""The config the app was built with (the first snapshot's)."""
TABLES = web.AppKey("tables", TableHolder)
DRAINING = web.AppKey("draining", asyncio.Event)
STARTED_AT = web.AppKey("started_at", float)
METERING = web.AppKey("metering", bool)
"""Whether requests are metered at all (metrics or a ledger on)."""


async def backends_ctx(app: web.Application) -> AsyncIterator[None]:
    """The adapters, each on a connection pool of its own (gateway.upstreams); all closed at shutdown."""
    tables = app[TABLES]
    tables.swap(Table(app[CONFIG], await build_adapters(app[CONFIG], tables.upstreams)))
    try:
        yield
    finally:
        await tables.aclose()


AUDIO_WORKERS = web.AppKey("audio_workers", AudioWorkers)


async def workers_ctx(app: web.Application) -> AsyncIterator[None]:
    """The app's one audio worker pool (audio/workers.py); stopped after the last request, once the
    tasks still running have finished."""
    server = app[CONFIG].server
    workers = app[AUDIO_WORKERS] = AudioWorkers(server.audio_workers, server.audio_queue)
    try:
        yield
    finally:
        await workers.aclose()


async def ledger_ctx(app: web.Application) -> AsyncIterator[None]:
    """The usage ledger's writer thread, flushed and stopped at shutdown."""
    writer = app[LEDGER] = LedgerWriter(app[CONFIG].ledger)
    try:
        yield
    finally:
        await asyncio.to_thread(writer.close)


async def metrics_port_ctx(app: web.Application) -> AsyncIterator[None]:
    """/metrics on a port of its own, so that the public ingress cannot reach it."""
    config = app[CONFIG]
    metrics_app = web.Application()
    metrics_app.router.add_get("/metrics", metrics_handler(app[METRICS]))
    runner = web.AppRunner(metrics_app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, config.metrics.host or config.server.host, config.metrics.port).start()
    try:
        yield
    finally:
        await runner.cleanup()


def init_state(app: web.Application, config: Config) -> None:
    app[CONFIG] = config
    app[TABLES] = TableHolder(Upstreams())
    app[DRAINING] = asyncio.Event()
    app[STARTED_AT] = time.time()
    app[METERING] = config.metrics.enabled or config.ledger.sink != "off"
    if config.metrics.enabled:
        app[METRICS] = Metrics()
