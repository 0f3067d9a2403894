"""What a worker of `gateway serve --workers N` gets from its parent (gateway/supervisor.py), and its side
of the channel between them.

Descriptors are passed by number (`pass_fds` keeps the numbers): the listen sockets, the metrics
port's, and the worker's end of a socket pair, its channel. The channel carries lines from worker to
parent only: `ready` once the worker serves, then the usage ledger's records (one JSON object a line,
from the ledger's writer thread). The parent never writes to it, so when it becomes readable, the
parent has gone: the worker then drains and exits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TextIO

from aiohttp import web

log = logging.getLogger("gateway.supervisor")

READY = b"ready"


@dataclass(frozen=True, slots=True)
class WorkerLink:
    """What a worker gets from its parent: inherited descriptors, by number (the same in both processes)."""

    slot: int
    listen: tuple[int, ...]
    metrics: int | None
    channel: int
    """A socket pair's end: lines to the parent (`ready`, ledger records); closed by the parent's death."""

    def encode(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, text: str) -> WorkerLink:
        raw = json.loads(text)
        return cls(raw["slot"], tuple(raw["listen"]), raw["metrics"], raw["channel"])

    def sites(self, runner: web.BaseRunner) -> list[web.BaseSite]:
        return [web.SockSite(runner, socket.socket(fileno=fd)) for fd in self.listen]

    def metrics_socket(self) -> socket.socket | None:
        return None if self.metrics is None else socket.socket(fileno=self.metrics)

    def ledger_stream(self) -> TextIO:
        """The worker's ledger writer's stream: its own descriptor of the channel."""
        return os.fdopen(os.dup(self.channel), "w", encoding="utf-8")

    def serving(self, loop: asyncio.AbstractEventLoop, orphaned: Callable[[], None]) -> None:
        """Tell the parent this worker serves; call `orphaned` if the parent goes away (its end closes)."""
        os.write(self.channel, READY + b"\n")

        def gone() -> None:
            loop.remove_reader(self.channel)
            log.error("worker %d: the parent process is gone; draining", self.slot)
            orphaned()

        loop.add_reader(self.channel, gone)  # the parent never writes: readable means closed
