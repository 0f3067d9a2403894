"""Running the gateway process: listen, reload on SIGHUP, drain and exit cleanly on SIGTERM.

Shutdown, in order (Kubernetes removes a pod from its endpoints while it still answers):
  1. SIGTERM (or SIGINT): /readyz answers 503 at once;
  2. for `server.drain_delay_s` new connections are still accepted and served normally;
  3. then the listening socket closes (new connections are refused), while requests in flight,
     long speech streams and uploads still arriving included, get up to `server.grace_s` to finish;
  4. idle connections close, whatever is left is cancelled, the backends' adapters and sessions
     close, and the process exits 0.
Step 3 is ours, not aiohttp's: aiohttp's own shutdown stops reading from connections at once,
which would cut an upload whose body is still arriving.
A worker of `serve --workers N` runs the same, on sockets its parent bound (gateway/supervisor.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from aiohttp import web

from gateway.app import build_app
from gateway.config import Config
from gateway.connections import make_runner
from gateway.state import DRAINING, RELOADER, TABLES, WORKER
from gateway.worker_link import WorkerLink

log = logging.getLogger("gateway")


async def serve(config: Config, link: WorkerLink | None = None) -> None:
    """Serve until SIGTERM; as one of `serve --workers N` (gateway/supervisor.py) when `link` is given."""
    host, port = config.server.host, config.server.port
    app = build_app(config)
    if link is not None:
        app[WORKER] = link
    runner = make_runner(app, config.server, shutdown_timeout=1.0)
    await runner.setup()
    sites = link.sites(runner) if link else [web.TCPSite(runner, host, port, reuse_address=True)]
    for site in sites:
        await site.start()
    who = f"worker {link.slot} (pid {os.getpid()})" if link else "gateway"
    log.info("%s listening on http://%s:%d with %s (config %s)", who, host, port, config.source, config.digest)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if RELOADER in app:
        loop.add_signal_handler(signal.SIGHUP, app[RELOADER].request, "SIGHUP")  # keeps the task
    if link is not None:
        link.serving(loop, stop.set)
        if RELOADER in app:
            app[RELOADER].request("worker started")  # an edit made while this worker started, SIGHUP or not
    try:
        await stop.wait()
        app[DRAINING].set()
        log.info("draining: /readyz fails now; still accepting for %.1f s, then %.1f s for requests in flight",
                 config.server.drain_delay_s, config.server.grace_s)
        await asyncio.sleep(config.server.drain_delay_s)
        for site in sites:
            await site.stop()
        tables = app[TABLES]
        log.info("no longer accepting connections; waiting for %d requests in flight", tables.in_flight)
        try:
            await asyncio.wait_for(tables.idle.wait(), config.server.grace_s)
        except TimeoutError:
            log.warning("grace period over: cancelling %d requests in flight", tables.in_flight)
    finally:
        await runner.cleanup()
    log.info("%s stopped", who)
