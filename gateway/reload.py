"""Config reload without restart: on SIGHUP and when the config file changes (including Kubernetes'
ConfigMap symlink swap). A new config is parsed and its adapters built in full before anything
changes; if anything fails (an unreadable or non-UTF-8 file, bad YAML, a value out of range, a
backend that cannot be built, a config with no keys or no models, even a bug of ours), the old
config keeps serving, every error is logged by YAML path and counted as
`gateway_config_reload_total{result="failure"}`, and the watcher goes on to the next edit.
Backends whose settings did not change keep their adapter (and its loaded model).
Requests in flight finish on the snapshot they started with (see lifecycle.TableHolder).

Only the mapping table reloads (keys, backends, models, voices, prices, limits, budgets). `server`,
`metrics`, `ledger` and `state` settings take effect at the next restart; a reload that changes them says
so in the log.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from gateway.adapters import ADAPTERS, build_adapters
from gateway.config import Config, ConfigError, parse_config, read_config_text, unservable
from gateway.engine_process import engine_specs
from gateway.state import CONFIG, ENGINES, METRICS, RELOADER, TABLES, WORKER
from gateway.table import Table

log = logging.getLogger("gateway.reload")


def fingerprint(path: str | Path) -> tuple[int, int, int] | None:
    """What changes when the file (or the symlink chain leading to it) is replaced or edited."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class Reloader:
    def __init__(self, app: web.Application, path: str) -> None:
        self.app = app
        self.path = Path(path)
        self._lock = asyncio.Lock()
        self._fingerprint = self._stat()
        self._requested: set[asyncio.Task[bool | None]] = set()

    def _stat(self) -> tuple[int, int, int] | None:
        return fingerprint(self.path)

    def request(self, why: str) -> None:
        """Reload soon (from a signal handler); the task is kept until done and cancelled at shutdown."""
        task = asyncio.get_running_loop().create_task(self.reload(why))
        self._requested.add(task)
        task.add_done_callback(self._requested.discard)

    async def reload(self, why: str) -> bool | None:
        """Load the file again. True: applied; False: refused, old config kept; None: unchanged.
        Never raises: whatever goes wrong reading, parsing or building, the old table keeps serving."""
        async with self._lock:
            if not self.app[TABLES].serving:
                return None  # not started yet, or shut down
            current = self.app[TABLES].current
            try:
                text = await asyncio.to_thread(read_config_text, self.path)
                if hashlib.sha256(text.encode()).hexdigest()[:16] == current.config.digest:
                    return None
                config = await asyncio.to_thread(parse_config, text, source=str(self.path), kinds=ADAPTERS.keys(),
                                                 placeholders=current.config.placeholders)
                refused = unservable(config)
                if refused:
                    raise ConfigError(refused)
                adapters = await build_adapters(config, self.app[TABLES].upstreams, reuse=current.adapters)
            except ConfigError as exc:
                return self._failed(exc.problems)
            except Exception as exc:  # a bug of ours: logged with its traceback, and still survived
                log.exception("config reload failed: %s: unexpected error", self.path)
                return self._failed([f"{self.path}: {type(exc).__name__}: {exc}"])
            self._warn_restart_only(current.config, config)
            self.app[TABLES].swap(Table(config, adapters))
            if ENGINES in self.app:  # a changed `process:` block restarts its engine, an unchanged one keeps running
                self.app[ENGINES].sync(engine_specs(config.backends))
            metrics = self.app.get(METRICS)
            if metrics is not None:
                metrics.config_reloads.labels("success").inc()
                metrics.config_loaded(config.digest)
            kept = sorted(name for name, adapter in adapters.items() if current.adapters.get(name) is adapter)
            log.info("config reloaded (%s): %s, digest %s; backends kept: %s", why, self.path, config.digest,
                     ", ".join(kept) or "none")
            return True

    def _failed(self, problems: list[str]) -> bool:
        for problem in problems:
            log.error("config reload failed: %s", problem)
        log.error("config reload failed; still serving config %s", self.app[TABLES].current.config.digest)
        metrics = self.app.get(METRICS)
        if metrics is not None:
            metrics.config_reloads.labels("failure").inc()
        return False

    def _warn_restart_only(self, old: Config, new: Config) -> None:
        # the listen address may come from the command line (--host/--port), not the file
        new = replace(new, server=replace(new.server, host=old.server.host, port=old.server.port))
        for section in ("server", "metrics", "ledger"):
            if getattr(old, section) != getattr(new, section):
                log.warning("config reload: changes to '%s' take effect at the next restart", section)
        if old.policy.state != new.policy.state:
            log.warning("config reload: changes to 'state' take effect at the next restart")

    async def watch(self, interval: float) -> None:
        """Poll the file's identity; reload when it changes. Runs until cancelled, whatever happens."""
        while True:
            await asyncio.sleep(interval)
            try:
                fingerprint = await asyncio.to_thread(self._stat)
                if fingerprint != self._fingerprint:
                    self._fingerprint = fingerprint
                    await self.reload("file changed")
            except Exception:  # reload() never raises; this keeps the watcher alive should that ever break
                log.exception("config watcher: unexpected error; still watching %s", self.path)

    async def aclose(self) -> None:
        for task in list(self._requested):
            task.cancel()
        await asyncio.gather(*self._requested, return_exceptions=True)




async def reload_ctx(app: web.Application) -> AsyncIterator[None]:
    """The reloader for the app's config file, and its file watcher while the app runs (in a worker of
    `serve --workers N` the parent watches, once for all, and SIGHUPs the workers: gateway/supervisor.py)."""
    config = app[CONFIG]
    reloader = app[RELOADER] = Reloader(app, config.source)
    metrics = app.get(METRICS)
    if metrics is not None:
        metrics.config_loaded(config.digest)
    watcher = None
    if config.server.reload_interval_s > 0 and WORKER not in app:
        watcher = asyncio.get_running_loop().create_task(reloader.watch(config.server.reload_interval_s))
    try:
        yield
    finally:
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        await reloader.aclose()
