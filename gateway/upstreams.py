"""Connections to the backends: one pool per backend, capped at its `max_connections`.

Each adapter gets a ClientSession of its own, with its own connector, so that one busy backend can
neither exhaust the sockets the others need nor open without bound (Envoy's per-cluster circuit
breaker, as an operator expects it). A request beyond the cap waits for a connection to come free,
for at most the backend's connect timeout (aiohttp's `ClientTimeout.connect` covers that wait), then
fails over like any connect timeout; it is never refused outright. A session lives exactly as long as
its adapter: whoever closes an adapter closes its pool through `Upstreams.close`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import aiohttp

from gateway.config import Backend

if TYPE_CHECKING:
    from gateway.adapters.base import Adapter


class Upstreams:
    """The open sessions, by the adapter that uses each."""

    def __init__(self) -> None:
        self._sessions: dict[int, aiohttp.ClientSession] = {}

    @staticmethod
    def open(backend: Backend) -> aiohttp.ClientSession:
        """A new pool for `backend` (no total timeout: streams are bounded per read by the adapters).
        Bodies are relayed as they arrive, never decompressed: backends are asked not to compress them."""
        connector = aiohttp.TCPConnector(limit=backend.max_connections, limit_per_host=0, enable_cleanup_closed=True)
        return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                     auto_decompress=False, trust_env=False, headers={"Accept-Encoding": "identity"})

    def attach(self, adapter: Adapter, session: aiohttp.ClientSession) -> None:
        self._sessions[id(adapter)] = session

    async def close(self, adapter: Adapter) -> None:
        """Close the adapter's pool (after the adapter itself is closed)."""
        session = self._sessions.pop(id(adapter), None)
        if session is not None:
            await session.close()

    def sessions(self) -> list[aiohttp.ClientSession]:
        return list(self._sessions.values())

    async def aclose(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)
