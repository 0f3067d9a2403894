"""App-wide state and its paired startup/cleanup: the HTTP client session, the adapters, draining."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from gateway.adapters import build_adapters
from gateway.config import Config
from gateway.ledger import LedgerWriter
from gateway.mapping import Table
from gateway.metering import LEDGER, METRICS, Metrics, metrics_handler


class TableHolder:
    """The current mapping-table snapshot; a reload swaps it whole, requests keep the one they took."""

    def __init__(self) -> None:
        self._current: Table | None = None

    @property
    def current(self) -> Table:
        if self._current is None:
            raise RuntimeError("the gateway has not started")
        return self._current

    def swap(self, table: Table) -> Table | None:
        old, self._current = self._current, table
        return old


CONFIG = web.AppKey("config", Config)
"""The config the app was built with (the first snapshot's)."""
TABLES = web.AppKey("tables", TableHolder)
HTTP = web.AppKey("http", aiohttp.ClientSession)
DRAINING = web.AppKey("draining", asyncio.Event)
STARTED_AT = web.AppKey("started_at", float)
METERING = web.AppKey("metering", bool)
"""Whether requests are metered at all (metrics or a ledger on)."""


async def backends_ctx(app: web.Application) -> AsyncIterator[None]:
    """One ClientSession for all backends (no total timeout: streams are bounded per read), and the
    adapters built on it; both closed at shutdown."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, enable_cleanup_closed=True)
    http = app[HTTP] = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                             auto_decompress=False, trust_env=False)
    adapters = build_adapters(app[CONFIG], http)
    app[TABLES].swap(Table(app[CONFIG], adapters))
    try:
        yield
    finally:
        for adapter in app[TABLES].current.adapters.values():
            await adapter.aclose()
        await http.close()


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
    app[TABLES] = TableHolder()
    app[DRAINING] = asyncio.Event()
    app[STARTED_AT] = time.time()
    app[METERING] = config.metrics.enabled or config.ledger.sink != "off"
    if config.metrics.enabled:
        app[METRICS] = Metrics()
