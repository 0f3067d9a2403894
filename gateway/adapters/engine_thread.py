"""An engine embedded in the gateway, on one thread of its own: loaded there, used there, stopped once.

PocketSphinx's decoder is not thread-safe, so each of its backends runs the engine on a single
dedicated thread (not on the shared audio workers); eSpeak NG, GPL, runs in a process instead
(adapters/espeak.py). The engine loads on that thread as the adapter is built, off the event loop;
`loaded` waits for it and maps a failed or stopped engine to the gateway's errors, so the adapters
only add what is their own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from gateway.config import Backend
from gateway.errors import Reason, UpstreamError

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


class EngineThread(Generic[T]):
    """`load()` run on the backend's own thread; `engine` is what it returned."""

    def __init__(self, backend: Backend, label: str, load: Callable[[], T]) -> None:
        self.backend, self.label = backend, label
        self.closed = False
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{label}-{backend.name}")
        self._engine = self.executor.submit(load)

    def error(self, what: str, reason: Reason) -> UpstreamError:
        return UpstreamError(f"Backend '{self.backend.name}' {what}.", reason=reason)

    async def loaded(self) -> T:
        """The engine, once loaded; a 502 if it is stopped or failed to load (logged once per call)."""
        if self.closed or self._engine.cancelled():
            raise self.error("is shut down", Reason.CLOSED)
        try:
            return await asyncio.wrap_future(self._engine)
        except Exception as exc:
            log.error("backend %s: %s failed to load", self.backend.name, self.label, exc_info=exc)
            raise self.error("failed to start", Reason.ENGINE) from None

    async def ready(self) -> bool:
        try:
            await self.loaded()
        except UpstreamError:
            return False
        return True

    def submit(self, fn: Callable[..., R], *args: object) -> asyncio.Future[R]:
        """`fn(*args)` on the engine's thread, after whatever runs there now; a 502 once it is stopped."""
        try:
            return asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        except RuntimeError:  # the executor is shut down
            raise self.error("is shut down", Reason.CLOSED) from None

    async def aclose(self) -> None:
        """Stop taking work, let what runs finish, and stop the thread."""
        self.closed = True
        await asyncio.to_thread(self.executor.shutdown, wait=True, cancel_futures=True)
