"""Supervised local engines: a backend's `process:` block is a command the gateway runs, keeps and stops.

    backends:
      piper:
        kind: wyoming
        url: "tcp://127.0.0.1:{port}"
        process:
          command: ["{python}", "-m", "wyoming_piper", "--uri", "tcp://127.0.0.1:{port}", ...]
          env: {}                 # added to the gateway's environment
          cwd: null
          ready_timeout_s: 60     # until the adapter's readiness probe passes
          stop_grace_s: 5         # after SIGTERM, before SIGKILL

Why a process and not an import: an engine may be GPL (Piper), may crash or leak, and must not share the
gateway's event loop or memory. The engine starts with the gateway; it counts as `starting` until its
adapter's readiness probe passes (`running`), `not_ready` if that takes longer than `ready_timeout_s` (logged;
the gateway serves its other backends meanwhile). An engine that exits is started again after a backoff that
doubles from 0.5 s to 30 s while it dies young (reset once it stayed up `STABLE_S`): `restarting`, its
restarts and last exit code in /readyz and `gateway_backend_restarts_total{backend}`. Its stdout and stderr
lines go to the log as `engine <backend>: <line>` (logger `engine.<backend>`), cut at `MAX_LINE` characters,
read as they come so that a chatty engine never blocks on a full pipe. At shutdown, after the
drain, it gets SIGTERM, `stop_grace_s`, then SIGKILL, to its whole process group.

No orphan, even when the gateway is SIGKILLed: each engine runs in a process group of its own and with a
parent-death signal (Linux `prctl(PR_SET_PDEATHSIG, SIGKILL)`, set between fork and exec), so the kernel
kills it when the gateway dies. One process owns the engines: the gateway, or in `serve --workers N` the
parent (gateway/supervisor.py), whose workers only connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from gateway.placeholders import Placeholders
from gateway.yaml_tree import YamlTree

log = logging.getLogger("gateway.engines")

BACKOFF_S = (0.5, 30.0)
"""First and longest wait before an engine that exited is started again (doubling while it dies young)."""
STABLE_S = 30.0
"""An engine that ran this long before exiting restarts after the shortest backoff again."""
MAX_LINE = 2000
"""Longest output line logged; the rest of a longer line is dropped (said with a marker)."""
PROBE_EVERY_S = 0.2
"""How often the readiness probe runs while an engine starts (1 s once `ready_timeout_s` is past)."""
_FIELDS = {"command", "env", "cwd", "ready_timeout_s", "stop_grace_s"}

Probe = Callable[[str], Awaitable[bool]]
"""backend name -> whether its adapter's readiness probe passes now."""


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """A backend's `process:` block, placeholders resolved."""

    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    cwd: str | None = None
    ready_timeout_s: float = 60.0
    stop_grace_s: float = 5.0
    """After SIGTERM at shutdown (or a reload that changes it), then SIGKILL."""
    url: str | None = None
    """The backend's url, where the engine must listen: a reload that changes it restarts the engine too."""


def process_section(p: YamlTree, value: Any, path: str, backend: str, placeholders: Placeholders) -> EngineSpec | None:
    """`backends.<b>.process`, or None when absent; every problem by YAML path."""
    if value is None:
        return None
    node = p.mapping(value, path)
    for unknown in sorted(set(node) - _FIELDS):
        p.fail(f"{path}.{unknown}", f"unknown key (known: {', '.join(sorted(_FIELDS))})")
    raw = node.get("command")
    if not isinstance(raw, list) or not raw or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool)
                                                        for a in raw):
        p.fail(f"{path}.command", "expected a non-empty list of strings (the program, then its arguments)")
        raw = []
    command = tuple(placeholders.resolve(str(a), backend, p.fail, f"{path}.command[{i}]") for i, a in enumerate(raw))
    env = {}
    env_node = p.mapping(node.get("env"), f"{path}.env")
    for key in env_node:
        text = p.str_(env_node, key, f"{path}.env")
        if text is None or "\0" in text or "=" in key or "\0" in key or not key:
            p.fail(f"{path}.env.{key}", "expected a variable name and a string value")
            continue
        env[key] = placeholders.resolve(text, backend, p.fail, f"{path}.env.{key}")
    cwd = p.str_(node, "cwd", path)
    if cwd is not None:
        cwd = placeholders.resolve(cwd, backend, p.fail, f"{path}.cwd")
    if any("\0" in a for a in command) or (cwd and "\0" in cwd):
        p.fail(path, "a NUL character cannot be passed to a process")
    ready = p.number(node, "ready_timeout_s", path, 60.0, 0.1, 3600.0)
    grace = p.number(node, "stop_grace_s", path, 5.0, 0.0, 600.0)
    return EngineSpec(command, MappingProxyType(env), cwd, float(ready), float(grace))


@functools.cache
def _prctl() -> Any:
    """libc's prctl, looked up once (the process's own symbols: no ldconfig, no search)."""
    return ctypes.CDLL(None, use_errno=True).prctl


def die_with_parent() -> Callable[[], None] | None:
    """preexec_fn: SIGKILL this child when the process that started it dies (Linux); resolved before the
    fork, so the child only makes one call. Also the eSpeak adapter's child (adapters/espeak_process.py)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl, pdeathsig, parent = _prctl(), 1, os.getpid()  # 1: PR_SET_PDEATHSIG

    def preexec() -> None:
        prctl(pdeathsig, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)
    return preexec


class Engine:
    """One backend's engine process, kept running until `stop`."""

    def __init__(self, name: str, spec: EngineSpec, probe: Probe, on_change: Callable[[], None],
                 on_restart: Callable[[str], None]) -> None:
        self.name, self.spec, self._probe, self._changed, self._restarted = name, spec, probe, on_change, on_restart
        self.state = "starting"
        self.restarts = 0
        self.last_exit: int | None = None
        self.pid: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._out = logging.getLogger(f"engine.{name}")
        self._task = asyncio.get_running_loop().create_task(self._keep(), name=f"engine-{name}")

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "pid": self.pid, "restarts": self.restarts, "last_exit": self.last_exit}

    def _set(self, state: str) -> None:
        self.state = state
        self._changed()

    async def _keep(self) -> None:
        backoff = BACKOFF_S[0]
        while True:
            started = time.monotonic()
            code = await self._run_once()
            if self._stopping:
                return
            self.restarts += 1
            self.last_exit = code
            self._restarted(self.name)
            if time.monotonic() - started >= STABLE_S:
                backoff = BACKOFF_S[0]
            log.error("engine %s exited (%s); restarting it in %.1f s (restart %d)", self.name,
                      "could not start" if code is None else f"exit {code}" if code >= 0 else f"signal {-code}",
                      backoff, self.restarts)
            self._set("restarting")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_S[1])

    async def _run_once(self) -> int | None:
        """Start the engine, wait for it to exit: its exit code (negative: the signal), None if it never started."""
        try:
            proc = self._proc = await asyncio.create_subprocess_exec(
                *self.spec.command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env={**os.environ, **self.spec.env}, cwd=self.spec.cwd,
                start_new_session=True, preexec_fn=die_with_parent())
        except (OSError, ValueError) as exc:
            self.pid = None
            log.error("engine %s: cannot start %s: %s", self.name, self.spec.command[0], exc)
            return None
        self.pid = proc.pid
        self._set("starting")
        log.info("engine %s started (pid %d)", self.name, proc.pid)
        assert proc.stdout is not None and proc.stderr is not None
        helpers = [asyncio.ensure_future(self._pump(proc.stdout)), asyncio.ensure_future(self._pump(proc.stderr)),
                   asyncio.ensure_future(self._await_ready())]
        try:
            return await proc.wait()
        finally:
            helpers[2].cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    async def _await_ready(self) -> None:
        began = time.monotonic()
        late = False
        while True:
            with contextlib.suppress(Exception):
                if await self._probe(self.name):
                    log.info("engine %s ready after %.2f s", self.name, time.monotonic() - began)
                    self._set("running")
                    return
            if not late and time.monotonic() - began > self.spec.ready_timeout_s:
                late = True
                log.error("engine %s not ready %.0f s after it started (ready_timeout_s); still waiting", self.name,
                          self.spec.ready_timeout_s)
                self._set("not_ready")
            await asyncio.sleep(1.0 if late else PROBE_EVERY_S)

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        """Log each output line under the engine's name, cut at MAX_LINE; never holds more than one line."""
        tail, cut = b"", False
        while chunk := await stream.read(1 << 14):
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            for line in lines:
                if not cut:
                    self._line(line)
                cut = False
            if len(tail) > MAX_LINE:
                if not cut:
                    self._line(tail)
                tail, cut = b"", True
        if tail and not cut:
            self._line(tail)

    def _line(self, line: bytes) -> None:
        if len(line) > MAX_LINE:
            line = line[:MAX_LINE] + b" [...]"
        self._out.info("engine %s: %s", self.name, line.decode("utf-8", "replace").rstrip("\r"))

    async def stop(self) -> None:
        """SIGTERM to its process group, `stop_grace_s`, then SIGKILL; returns once it has exited."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), self.spec.stop_grace_s)
            except TimeoutError:
                log.warning("engine %s (pid %d) still running %.1f s after SIGTERM: killed", self.name, proc.pid,
                            self.spec.stop_grace_s)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(ProcessLookupError):  # whatever it left in its group
            if proc is not None:
                os.killpg(proc.pid, signal.SIGKILL)
        self._set("stopped")
        log.info("engine %s stopped", self.name)


class Engines:
    """The engines of the backends that have a `process:` block: started, restarted on change, stopped."""

    def __init__(self, probe: Probe, on_change: Callable[[], None] = lambda: None) -> None:
        self._probe, self._changed = probe, on_change
        self.engines: dict[str, Engine] = {}
        self.totals: dict[str, int] = {}
        """backend name -> restarts since the gateway started (gateway_backend_restarts_total)."""
        self._wanted: Mapping[str, EngineSpec] = {}
        self._stops: set[asyncio.Task[None]] = set()
        self._starts: set[asyncio.Task[None]] = set()

    def sync(self, specs: Mapping[str, EngineSpec]) -> None:
        """Make the running engines those of `specs`: a new or changed block (re)starts its engine (the old one
        stopped first: it holds the address), an unchanged one keeps running, a removed one stops."""
        self._wanted = dict(specs)
        for name, engine in list(self.engines.items()):
            if specs.get(name) != engine.spec:
                del self.engines[name]
                self._track(self._stops, engine.stop())
        for name, spec in specs.items():
            if name not in self.engines:
                self._track(self._starts, self._start_after_stops(name, spec, list(self._stops)))

    async def _start_after_stops(self, name: str, spec: EngineSpec, stops: list[asyncio.Task[None]]) -> None:
        await asyncio.gather(*stops, return_exceptions=True)
        if name not in self.engines and self._wanted.get(name) == spec:  # a later sync may have changed it
            self.engines[name] = Engine(name, spec, self._probe, self._changed, self._restarted)
            self._changed()

    def _restarted(self, name: str) -> None:
        self.totals[name] = self.totals.get(name, 0) + 1

    @staticmethod
    def _track(tasks: set[asyncio.Task[None]], coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def status(self) -> dict[str, dict[str, Any]]:
        return {name: engine.status() for name, engine in sorted(self.engines.items())}

    async def aclose(self) -> None:
        """Stop every engine (concurrently: each SIGTERM, its grace, SIGKILL)."""
        self._wanted = {}
        await asyncio.gather(*self._starts, *self._stops, return_exceptions=True)
        engines, self.engines = list(self.engines.values()), {}
        await asyncio.gather(*(e.stop() for e in engines), return_exceptions=True)


def engine_specs(backends: Mapping[str, Any]) -> dict[str, EngineSpec]:
    """backend name -> its `process:` block with its url, for the backends that have one."""
    return {name: replace(b.process, url=b.url) for name, b in backends.items() if b.process is not None}


class EngineView:
    """A worker's view of the engines its parent owns (`serve --workers N`): read from the parent's
    `status.json` every `REFRESH_S`, off the event loop; it starts and stops nothing."""

    REFRESH_S = 1.0

    def __init__(self, directory: str) -> None:
        self._path = os.path.join(directory, STATUS_FILE)
        self._status: dict[str, Any] = {"engines": {}, "totals": {}}
        self._task = asyncio.get_running_loop().create_task(self._refresh(), name="engine-view")

    def sync(self, specs: Mapping[str, EngineSpec]) -> None:
        """The parent starts and stops the engines."""

    def status(self) -> dict[str, dict[str, Any]]:
        return dict(self._status.get("engines", {}))

    @property
    def totals(self) -> dict[str, int]:
        return dict(self._status.get("totals", {}))

    def _read(self) -> dict[str, Any] | None:
        try:
            with open(self._path, encoding="utf-8") as f:
                found = json.load(f)
        except (OSError, ValueError):
            return None
        return found if isinstance(found, dict) else None

    async def _refresh(self) -> None:
        while True:
            found = await asyncio.to_thread(self._read)
            if found is not None:
                self._status = found
            await asyncio.sleep(self.REFRESH_S)

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


STATUS_FILE = "status.json"


async def publish_status(engines: Engines, directory: str, changed: asyncio.Event) -> None:
    """The owner's side of EngineView: write `status.json` whenever an engine changes state (until cancelled)."""
    path = os.path.join(directory, STATUS_FILE)

    def write(text: str) -> None:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)

    while True:
        changed.clear()
        with contextlib.suppress(OSError):
            await asyncio.to_thread(write, json.dumps({"engines": engines.status(), "totals": engines.totals}))
        await changed.wait()
