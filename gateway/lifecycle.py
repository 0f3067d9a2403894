"""App-wide state and its paired startup/cleanup: the backends' connection pools, the adapters, draining."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator

from aiohttp import web

from gateway.adapters import build_adapters
from gateway.audio.workers import AudioWorkers
from gateway.balance import InFlight
from gateway.capacity import Gates
from gateway.config import Config
from gateway.ejection import Ejections
from gateway.engine_process import Engines, EngineView, engine_specs
from gateway.ledger import LedgerWriter
from gateway.metering import Metrics, metrics_handler
from gateway.placeholders import ENV_DIR
from gateway.policy.shared import SharedState
from gateway.spool import SpoolMemory
from gateway.state import (
    AUDIO_WORKERS,
    CONFIG,
    DRAINING,
    EJECTIONS,
    ENGINES,
    GATES,
    IN_FLIGHT,
    LEDGER,
    METERING,
    METRICS,
    REALTIME_SESSIONS,
    SHARED_STATE,
    SPOOL_MEMORY,
    STARTED_AT,
    TABLES,
    WORKER,
)
from gateway.table import Table, TableHolder
from gateway.upstreams import Upstreams

log = logging.getLogger("gateway.lifecycle")




async def backends_ctx(app: web.Application) -> AsyncIterator[None]:
    """The adapters, each on a connection pool of its own (gateway.upstreams); all closed at shutdown."""
    tables = app[TABLES]
    tables.swap(Table(app[CONFIG], await build_adapters(app[CONFIG], tables.upstreams)))
    try:
        yield
    finally:
        await tables.aclose()




async def engines_ctx(app: web.Application) -> AsyncIterator[None]:
    """The backends' supervised engines (gateway/engine_process.py), started after the adapters (whose
    readiness probe says when each is ready) and stopped before them, at shutdown, once the drain is over
    (gateway/server.py). A worker of `serve --workers N` only reads its parent's, which owns them."""
    config = app[CONFIG]
    metrics = app.get(METRICS)
    if WORKER in app:
        engines: Engines | EngineView = EngineView(os.environ.get(ENV_DIR, ""))  # never starts one itself
    else:
        engines = Engines(lambda name: _probe(app, name), app[TABLES].changed.set)  # re-probed at each change
        engines.sync(engine_specs(config.backends))
    app[ENGINES] = engines
    if metrics is not None:
        metrics.view.engines = engines
    try:
        yield
    finally:
        await engines.aclose()
        if WORKER not in app:
            config.placeholders.cleanup()


async def _probe(app: web.Application, name: str) -> bool:
    """The current adapter's readiness probe for backend `name`, bounded by `server.probe_timeout_s`."""
    adapter = app[TABLES].current.adapters.get(name)
    if adapter is None:
        return False
    async with asyncio.timeout(app[CONFIG].server.probe_timeout_s):
        return bool(await adapter.ready())


async def shared_state_ctx(app: web.Application) -> AsyncIterator[None]:
    """The state store limits, budgets and backend slots are counted in (`state:`; opened on first use, so
    a config without them never touches it), closed at shutdown. A reload that changes `state:` only warns."""
    shared = app[SHARED_STATE] = app[GATES].shared = SharedState(app[CONFIG].policy.state, app.get(METRICS))
    try:
        yield
    finally:
        await app[GATES].close()
        await shared.close()


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
    """The usage ledger's writer thread, flushed and stopped at shutdown. A worker's writes to its parent."""
    link = app.get(WORKER)
    writer = app[LEDGER] = LedgerWriter(app[CONFIG].ledger, link.ledger_stream() if link else None)
    try:
        yield
    finally:
        await asyncio.to_thread(writer.close)


async def metrics_port_ctx(app: web.Application) -> AsyncIterator[None]:
    """/metrics on a port of its own, so that the public ingress cannot reach it. A worker serves it on
    the socket its parent bound (gateway/supervisor.py)."""
    config = app[CONFIG]
    metrics_app = web.Application()
    metrics_app.router.add_get("/metrics", metrics_handler(app[METRICS]))
    runner = web.AppRunner(metrics_app, access_log=None)
    await runner.setup()
    link = app.get(WORKER)
    sock = link.metrics_socket() if link else None
    if sock is not None:
        await web.SockSite(runner, sock).start()
    elif link is None:
        await web.TCPSite(runner, config.metrics.host or config.server.host, config.metrics.port).start()
    else:
        log.warning("metrics.port was set after the gateway started: it takes effect at the next restart")
    try:
        yield
    finally:
        await runner.cleanup()


def init_state(app: web.Application, config: Config) -> None:
    app[CONFIG] = config
    app[TABLES] = TableHolder(Upstreams())
    app[DRAINING] = asyncio.Event()
    app[STARTED_AT] = time.time()
    app[METERING] = config.metered
    app[SPOOL_MEMORY] = SpoolMemory(config.server.spool_memory_uploads)
    app[REALTIME_SESSIONS] = set()
    if config.metrics.enabled:
        app[METRICS] = Metrics()
    app[EJECTIONS] = Ejections(app[TABLES], app.get(METRICS))
    app[IN_FLIGHT] = InFlight(app.get(METRICS))
    app[GATES] = Gates(app[TABLES], app.get(METRICS))
