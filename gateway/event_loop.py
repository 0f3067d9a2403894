"""Which event loop `gateway serve` runs on: uvloop when it is installed (the `fast` extra), else asyncio's own.

uvloop is libuv behind asyncio's API, so the gateway's code does not change; what changes is the cost of
every socket read, write and timer, which is much of a pass-through's CPU. Measured with tests/perf/
test_cpu_per_request.py it gave about 5% more requests per CPU-second on speech, 0.2 ms less p50 at one
connection, and never clearly less (docs/deploy.md has the figures), hence the default.
`GATEWAY_EVENT_LOOP` overrides the choice: `asyncio` turns uvloop off (to rule it out when chasing a bug,
or on a platform it does not support), `uvloop` insists on it (startup fails if it is missing), `auto` is
the default. It is an environment variable rather than a config key because the loop exists before the
config is read, and a SIGHUP reload could not change it anyway.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
from collections.abc import Callable, Coroutine
from types import ModuleType
from typing import Any, TypeVar

from gateway.config import ConfigError

ENV = "GATEWAY_EVENT_LOOP"
CHOICES = ("auto", "uvloop", "asyncio")

log = logging.getLogger("gateway")
T = TypeVar("T")


def _uvloop() -> ModuleType | None:
    try:
        return importlib.import_module("uvloop")
    except ImportError:
        return None


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """The `loop_factory` for `asyncio.run` that `GATEWAY_EVENT_LOOP` asks for (ConfigError if it cannot be
    had). The loop it makes logs its name once created, so every process's log says which loop it runs."""
    choice = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise ConfigError([f"{ENV}={choice!r}: expected one of {', '.join(CHOICES)}"])
    uvloop = None if choice == "asyncio" else _uvloop()
    if choice == "uvloop" and uvloop is None:
        raise ConfigError([f"{ENV}=uvloop, but uvloop is not installed (pip extra: fast)"])
    make: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop if uvloop is None else uvloop.new_event_loop
    name = "asyncio" if uvloop is None else f"uvloop {uvloop.__version__}"

    def new_loop() -> asyncio.AbstractEventLoop:
        loop = make()
        log.info("event loop: %s (%s=%s)", name, ENV, choice)
        return loop

    return new_loop


def run(main: Coroutine[Any, Any, T], loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> T:
    """`asyncio.run(main, loop_factory=...)`, which Python 3.11 lacks (it came in 3.12)."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main)
