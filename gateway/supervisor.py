"""`gateway serve --workers N`: N worker processes on one port, and the small parent that keeps them.

The parent binds the listen sockets (and the metrics port's) once and starts each worker as a fresh
interpreter (`python -m gateway serve ... --worker LINK`, fork and exec at once: never a fork that
goes on running a copy of a parent with threads), passing the sockets by file descriptor. Every
worker accepts on the same socket with its own event loop, app, adapters, audio pool and backend
probes. What is process-wide is owned once, by the parent:

- the usage ledger: each worker sends its records, one JSON line each, over a socket pair (its
  channel) from the ledger's writer thread; the parent's one `LedgerWriter` appends and rotates. A
  record is never lost on a clean drain: a worker flushes before it exits, and the parent reads each
  channel to its end. A worker killed outright loses what it had not sent yet (at most
  `LedgerWriter.FLUSH_INTERVAL` of records); a partial last line is dropped, never written;
- the config file watcher: the parent polls the file every `server.reload_interval_s` and SIGHUPs the
  workers, which each load it (a worker's own watcher is off); SIGHUP to the parent does the same;
- the supervised engines (gateway/engine_process.py): the parent picks their addresses (`{port}`,
  `{socket}`: gateway/placeholders.py, which its workers read, so all connect to the one engine), starts,
  probes, restarts and stops them, and publishes their state in a file every worker reads for /readyz and
  `gateway_backend_restarts_total`; at shutdown they stop once every worker has drained and exited;
- metrics: workers record into prometheus_client's multiprocess files, in a fresh directory per
  parent run (PROMETHEUS_MULTIPROC_DIR, set before a worker imports prometheus_client), and every
  worker's /metrics answers the sum over all of them (gateway/metering.py). The parent marks a worker
  dead when it exits, so its live gauges go; its counters stay, and its replacement counts from zero.

SIGTERM or SIGINT to the parent: it closes its own copy of the listen socket and SIGTERMs every
worker at once, each of which drains by the single-process contract (gateway/server.py), so /readyz
fails on every worker at once; then the parent exits 0. A worker still running `drain_delay_s +
grace_s + KILL_AFTER_S` later is killed. A worker that exits untold is logged and restarted, after
a backoff that doubles while workers die young. A worker whose parent is gone sees its channel
close and drains too.

The channel (gateway/worker_link.py) carries lines from worker to parent: `ready` once the worker
serves (only then does it get SIGHUPs; it then checks the file once itself, so an edit made while it
started is not missed) and ledger records.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass

from prometheus_client import multiprocess

from gateway.adapters import ADAPTERS, adapter_class
from gateway.adapters.base import Adapter
from gateway.config import Config, ConfigError, load_config, unservable
from gateway.engine_process import Engines, engine_specs, publish_status
from gateway.ledger import LedgerWriter
from gateway.placeholders import ENV_DIR
from gateway.reload import fingerprint
from gateway.table import close_adapters
from gateway.upstreams import Upstreams
from gateway.worker_link import READY, WorkerLink

log = logging.getLogger("gateway.supervisor")

RESTART_BACKOFF_S = (0.5, 30.0)
"""First and longest wait before a crashed worker is started again (doubling while workers die young)."""
STABLE_S = 30.0
"""A worker that ran this long before dying restarts after the shortest backoff again."""
KILL_AFTER_S = 5.0
"""After drain_delay_s + grace_s + this, a worker still running is killed."""


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, as a container's cpuset sets it)."""
    return len(os.sched_getaffinity(0))


def bind(host: str, port: int) -> list[socket.socket]:
    """Listen sockets for every address `host` resolves to, as asyncio's create_server would bind."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks = []
    for family, kind, proto, _, address in dict.fromkeys(found):
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen()  # each worker's SockSite listens again with aiohttp's backlog (128), as TCPSite does
        socks.append(sock)
    return socks


@dataclass(slots=True)
class Worker:
    slot: int
    proc: asyncio.subprocess.Process
    ready: bool = False


class Supervisor:
    def __init__(self, config: Config, count: int) -> None:
        self.config = config
        self.count = count
        self.draining = asyncio.Event()
        self.workers: dict[int, Worker] = {}
        self.listen = bind(config.server.host, config.server.port)
        self.metrics_sock = None
        if config.metrics.enabled and config.metrics.port is not None:
            self.metrics_sock = bind(config.metrics.host or config.server.host, config.metrics.port)[0]
        self.metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-") if config.metrics.enabled else None
        self.ledger = LedgerWriter(config.ledger) if config.ledger.sink != "off" else None
        self.backends = config.backends
        """The backends of the config last loaded (its engines' blocks); `config` stays the one started with."""
        self.engine_dir = config.placeholders.directory
        self._probes: dict[str, Adapter] = {}
        self._upstreams = Upstreams()
        self._reloads: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        self.engines = Engines(self._probe, changed.set)
        self.engines.sync(engine_specs(self.backends))
        publisher = loop.create_task(publish_status(self.engines, self.engine_dir, changed))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.drain)
        loop.add_signal_handler(signal.SIGHUP, self.reload, "SIGHUP")
        server = self.config.server
        log.info("gateway listening on http://%s:%d with %s (config %s): %d workers", server.host, server.port,
                 self.config.source, self.config.digest, self.count)
        keepers = [loop.create_task(self._keep(slot)) for slot in range(1, self.count + 1)]
        watcher = loop.create_task(self._watch()) if server.reload_interval_s > 0 else None
        try:
            await self.draining.wait()
            budget = server.drain_delay_s + server.grace_s + KILL_AFTER_S
            _, late = await asyncio.wait(keepers, timeout=budget)
            for worker in list(self.workers.values()):
                log.error("worker %d (pid %d) still running %.1f s after SIGTERM: killed", worker.slot,
                          worker.proc.pid, budget)
                worker.proc.kill()
            await asyncio.gather(*late, return_exceptions=True)
        finally:
            await asyncio.gather(*self._reloads, return_exceptions=True)
            await self.engines.aclose()  # once every worker has drained and exited
            publisher.cancel()
            await self._close_probes()
            self.config.placeholders.cleanup()
            if watcher is not None:
                watcher.cancel()
            for task in keepers:
                task.cancel()
            await asyncio.gather(*keepers, *([watcher] if watcher else []), return_exceptions=True)
            self.close_sockets()
            if self.ledger is not None:
                await asyncio.to_thread(self.ledger.close)
            if self.metrics_dir is not None:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)
        log.info("gateway stopped")

    def close_sockets(self) -> None:
        for sock in [*self.listen, *([self.metrics_sock] if self.metrics_sock else [])]:
            sock.close()

    def drain(self) -> None:
        if self.draining.is_set():
            return
        self.draining.set()
        server = self.config.server
        log.info("draining %d workers: /readyz fails now; still accepting for %.1f s, then %.1f s for requests "
                 "in flight", len(self.workers), server.drain_delay_s, server.grace_s)
        for sock in self.listen:  # the workers' copies close after drain_delay_s; then the port is closed
            sock.close()
        for worker in self.workers.values():
            worker.proc.send_signal(signal.SIGTERM)

    def reload(self, why: str) -> None:
        task = asyncio.get_running_loop().create_task(self._reload(why))
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def _reload(self, why: str) -> None:
        """Load the file for the engines' blocks (a changed one restarts its engine), then SIGHUP the workers,
        which load it themselves (and log why, should it not load)."""
        try:
            config = await asyncio.to_thread(load_config, self.config.source, kinds=ADAPTERS.keys(),
                                             placeholders=self.config.placeholders)
        except ConfigError:
            pass  # the workers refuse it too, each saying why by YAML path
        else:
            if not self.draining.is_set() and not unservable(config):  # an empty file must not stop the engines
                self.backends = config.backends
                self.engines.sync(engine_specs(config.backends))
        ready = [w for w in self.workers.values() if w.ready]
        log.info("config reload (%s): telling %d workers", why, len(ready))
        for worker in ready:
            worker.proc.send_signal(signal.SIGHUP)

    async def _probe(self, name: str) -> bool:
        """An engine's readiness: its backend's adapter's probe (one adapter per engine, kept for probing only)."""
        backend = self.backends.get(name)
        if backend is None:
            return False
        adapter = self._probes.get(name)
        if adapter is None or adapter.backend != backend:
            if adapter is not None:
                await close_adapters([adapter], self._upstreams)
            http = self._upstreams.open(backend)
            adapter = self._probes[name] = adapter_class(backend.kind)(backend, http)
            self._upstreams.attach(adapter, http)
        async with asyncio.timeout(self.config.server.probe_timeout_s):
            return bool(await adapter.ready())

    async def _close_probes(self) -> None:
        await close_adapters(self._probes.values(), self._upstreams)
        await self._upstreams.aclose()

    async def _watch(self) -> None:
        """The one config file watcher (workers run none): a changed file means SIGHUP to every worker."""
        path = self.config.source
        seen = await asyncio.to_thread(fingerprint, path)
        while True:
            await asyncio.sleep(self.config.server.reload_interval_s)
            now = await asyncio.to_thread(fingerprint, path)
            if now != seen:
                seen = now
                self.reload("file changed")

    async def _keep(self, slot: int) -> None:
        """Run worker `slot` until the drain; start it again whenever it exits untold."""
        backoff = RESTART_BACKOFF_S[0]
        while not self.draining.is_set():
            started = time.monotonic()
            try:
                pid, code = await self._run(slot)
            except OSError as exc:  # could not even start one (no memory, no descriptors left)
                pid, code, why = 0, 0, f"could not be started ({exc})"
            else:
                why = f"(pid {pid}) exited untold ({f'signal {-code}' if code < 0 else f'exit {code}'})"
            if self.draining.is_set():
                log.info("worker %d (pid %d) stopped (exit %d)", slot, pid, code)
                return
            if time.monotonic() - started >= STABLE_S:
                backoff = RESTART_BACKOFF_S[0]
            log.error("worker %d %s; restarting it in %.1f s", slot, why, backoff)
            try:
                await asyncio.wait_for(self.draining.wait(), backoff)
            except TimeoutError:
                pass
            backoff = min(backoff * 2, RESTART_BACKOFF_S[1])

    async def _run(self, slot: int) -> tuple[int, int]:
        """Start worker `slot` and read its channel until it exits: its pid and exit code."""
        mine, theirs = socket.socketpair()
        try:
            proc = await self._spawn(slot, theirs)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        worker = self.workers[slot] = Worker(slot, proc)
        if self.draining.is_set():
            proc.send_signal(signal.SIGTERM)
        try:
            await self._read(worker, mine)
            return proc.pid, await proc.wait()
        finally:
            del self.workers[slot]
            if self.metrics_dir is not None:
                multiprocess.mark_process_dead(proc.pid, self.metrics_dir)

    async def _spawn(self, slot: int, channel: socket.socket) -> asyncio.subprocess.Process:
        link = WorkerLink(slot, tuple(s.fileno() for s in self.listen),
                          self.metrics_sock.fileno() if self.metrics_sock else None, channel.fileno())
        env = dict(os.environ)
        if self.metrics_dir is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        env[ENV_DIR] = self.engine_dir
        server = self.config.server
        argv = [sys.executable, "-m", "gateway", "serve", "--config", self.config.source,
                "--host", server.host, "--port", str(server.port), "--worker", link.encode()]
        fds = (*link.listen, *([link.metrics] if link.metrics is not None else []), link.channel)
        return await asyncio.create_subprocess_exec(*argv, pass_fds=fds, env=env)

    async def _read(self, worker: Worker, channel: socket.socket) -> None:
        """Read a worker's channel to its end: `ready`, then ledger records for the parent's writer."""
        reader, writer = await asyncio.open_unix_connection(sock=channel)
        tail = b""
        try:
            while chunk := await reader.read(1 << 16):
                lines = (tail + chunk).split(b"\n")
                tail = lines.pop()
                for line in lines:
                    if line == READY:
                        worker.ready = True
                        log.info("worker %d (pid %d) serving", worker.slot, worker.proc.pid)
                    elif line and self.ledger is not None:  # none: `ledger` was turned on after the start
                        self.ledger.write_line(line.decode("utf-8", "replace") + "\n")
        finally:
            writer.close()
        if tail:
            log.warning("worker %d (pid %d) died while sending a ledger record: the partial record was dropped",
                        worker.slot, worker.proc.pid)


def supervise(config: Config, count: int) -> int:
    """Serve with `count` worker processes until SIGTERM; 0 once every worker has drained. The parent runs
    on asyncio's own loop (it serves no requests); each worker on the one gateway/event_loop.py picks."""
    try:
        supervisor = Supervisor(config, count)
    except OSError as exc:  # the port taken, the host unknown, no TMPDIR to write to
        log.error("cannot start %d workers on %s:%d: %s", count, config.server.host, config.server.port, exc)
        return 1
    asyncio.run(supervisor.run())
    return 0
