"""The mapping table at run time, and its snapshots.

A `Table` is an immutable snapshot of the config and the adapters built from it: public model ->
ordered routes to adapters, public voice -> native voice. `TableHolder` keeps the current one; a
reload swaps it whole, and `table_middleware` pins the snapshot each request started with, so a
reload never changes a request's routes halfway. Snapshots share the adapters of unchanged backends;
an adapter is closed once no live snapshot holds it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aiohttp import web

from gateway.adapters.base import SPEECH, TRANSCRIPTION, TRANSLATION, Adapter
from gateway.auth import Identity
from gateway.config import Config, NativeVoice
from gateway.errors import InvalidRequestError, UnsupportedError, model_not_found
from gateway.models import Model, Route
from gateway.state import IN_FLIGHT, TABLE, TABLES
from gateway.upstreams import Upstreams

log = logging.getLogger("gateway.table")

_MODEL_TASK = {SPEECH: "speech", TRANSCRIPTION: "transcription", TRANSLATION: "transcription"}


@dataclass(frozen=True, slots=True)
class Candidate:
    route: Route
    adapter: Adapter


@dataclass(frozen=True, slots=True)
class Table:
    config: Config
    adapters: Mapping[str, Adapter]

    def model(self, name: str, identity: Identity, task: str) -> Model:
        """The public model `name` for `task`, if it exists and this key may use it."""
        model = self.config.models.get(name)
        if model is None:
            raise model_not_found(name)
        identity.require(name)
        if model.task != _MODEL_TASK[task]:
            raise InvalidRequestError(
                f"The model `{name}` is a {model.task} model and cannot be used for {task}.",
                param="model", code="model_not_supported",
            )
        return model

    def candidates(self, model: Model, task: str) -> list[Candidate]:
        """The model's routes in YAML order, keeping those whose backend can do `task` (each request tries
        them in the order gateway/balance.py makes)."""
        found = [Candidate(r, self.adapters[r.backend]) for r in model.routes]
        able = [c for c in found if c.adapter.capabilities.can(task)]
        if not able:
            raise UnsupportedError(
                f"The model `{model.name}` cannot do {task} on any configured backend.",
                param="model", code="unsupported_task",
            )
        return able

    def voice(self, public: str, backend: str) -> NativeVoice:
        """The backend's voice for a public voice name; unknown names pass through as native ids."""
        return self.config.voices.get(public, {}).get(backend) or NativeVoice(public)

    def public_voices(self) -> list[dict[str, str | None]]:
        return [
            {"voice": name, "backend": backend, "native_voice": v.id, "speaker": v.speaker}
            for name, per_backend in self.config.voices.items()
            for backend, v in per_backend.items()
        ]


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
        """Set by each swap (a reload) and each change of a supervised engine's state, so that the health
        prober probes the table at once."""

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


@web.middleware
async def table_middleware(request: web.Request, handler: web.Handler) -> web.StreamResponse:
    """Pin the current mapping-table snapshot for the whole request; when it is over, end its attempts'
    in-flight counts (gateway/balance.py)."""
    tables = request.app[TABLES]
    table = request[TABLE] = tables.pin()
    try:
        return await handler(request)
    finally:
        tables.unpin(table)
        if (in_flight := request.app.get(IN_FLIGHT)) is not None:
            in_flight.release(request)
