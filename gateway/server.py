"""Running the gateway process: listen, reload on SIGHUP, drain and exit cleanly on SIGTERM.

Shutdown, in order (Kubernetes removes a pod from its endpoints while it still answers):
  1. SIGTERM (or SIGINT): /readyz answers 503 at once;
  2. for `server.drain_delay_s` new connections are still accepted and served normally;
  3. then the listening socket closes (new connections are refused) and idle keep-alive
     connections are closed, while requests in flight, long speech streams and uploads included,
     get up to `server.grace_s` to finish;
  4. the backends' adapters and sessions close, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from gateway.app import build_app
from gateway.config import Config
from gateway.lifecycle import DRAINING
from gateway.reload import RELOADER

log = logging.getLogger("gateway")


async def serve(config: Config, host: str, port: int) -> None:
    app = build_app(config)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, handle_signals=False,
                           shutdown_timeout=config.server.grace_s)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    log.info("gateway listening on http://%s:%d with %s (config %s)", host, port, config.source, config.digest)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if RELOADER in app:
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(app[RELOADER].reload("SIGHUP")))
    try:
        await stop.wait()
        app[DRAINING].set()
        log.info("draining: /readyz fails now; still accepting for %.1f s, then %.1f s for requests in flight",
                 config.server.drain_delay_s, config.server.grace_s)
        await asyncio.sleep(config.server.drain_delay_s)
        log.info("no longer accepting connections; waiting for requests in flight")
    finally:
        await runner.cleanup()
    log.info("gateway stopped")
