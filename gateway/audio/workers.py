"""The app's one pool of audio worker threads: decoding and measuring uploads, transcoding speech, and
the file writes that would otherwise block the event loop.

FFmpeg work holds a thread for milliseconds (a chunk) to seconds (measuring a long upload), so it
cannot run on the event loop, and one thread per stream would let a burst of requests start a
thread each. Every such piece of work runs here instead, on `size` threads created at startup
(lifecycle.workers_ctx) and shared by every request.

Admission bounds the work, not just the threads: a job (a transcoded stream, a decoded upload, an
upload's measurement) takes one of `size + queue` slots for its whole life and has at most one task
in the pool at a time, so at most `queue` tasks ever wait for a thread. When every slot is taken a
new job is refused with a 503 ServiceUnavailableError (Retry-After), raised where the job starts,
which is before any byte of its response. Small tasks of a request already being served (a rolled-
over spool write, the meter's end-of-stream measurement) run without a slot: refusing them would
fail a request midway, and each request has at most one of them in the pool at a time.

PocketSphinx keeps a single thread per backend (adapters/pocketsphinx.py): its decoder is not
thread-safe, so it must only ever run on one thread; a constant. eSpeak NG runs in a child process
per backend (adapters/espeak.py), off this pool too.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from gateway.errors import ServiceUnavailableError

T = TypeVar("T")


class AudioWorkers:
    """A bounded thread pool for audio work, with admission of jobs (see the module docstring)."""

    def __init__(self, size: int, queue: int) -> None:
        self.size, self.queue = size, queue
        self.admitted = 0
        """Jobs holding a slot now."""
        self.jobs = 0
        """Jobs admitted since start (an upload measured or decoded, a stream transcoded)."""
        self._executor = ThreadPoolExecutor(size, thread_name_prefix="audio-worker")
        started = threading.Barrier(size + 1)  # start every thread now: the thread count is fixed from startup
        for _ in range(size):
            self._executor.submit(started.wait)
        started.wait()

    def admit(self) -> None:
        """Take a slot for a job; a 503 when all `size + queue` are taken. Pair with `release`."""
        if self.admitted >= self.size + self.queue:
            raise ServiceUnavailableError("The server is busy with audio work; please retry shortly.",
                                          retry_after=1)
        self.admitted += 1
        self.jobs += 1

    def release(self) -> None:
        self.admitted -= 1

    @contextlib.contextmanager
    def job(self) -> Iterator[None]:
        """A slot for the duration of the block (`admit`, then `release`)."""
        self.admit()
        try:
            yield
        finally:
            self.release()

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on a worker thread. Cancelling the caller does not stop a task already running:
        callers that share state with it wait for it (a lock, or a closing task) before reusing that state."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def finish(self, fn: Callable[..., T], *args: object) -> T:
        """`run`, but a cancelled caller still waits for `fn` to end before the cancellation goes on, so
        what follows (closing a file `fn` writes) never runs alongside it."""
        future = asyncio.ensure_future(self.run(fn, *args))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await future
            raise

    async def aclose(self) -> None:
        """Wait for running tasks (queued ones are dropped) and stop the threads."""
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
