"""Per-request deadlines, on top of a backend's `timeout_s` (the longest gap between two reads, never a cap
on a whole call, so that a long stream is not cut):

- `backends.<b>.first_byte_timeout_s` (speech): the longest wait from the start of an attempt on that backend
  until its first audio chunk. A backend that queues requests silently, or sends headers and then nothing,
  fails the attempt as an upstream timeout before any byte went to the client, so the failover loop
  (gateway/handlers/routing.py) moves on as for any timeout. Once the first chunk is in hand it no longer
  applies: a slow but steady stream is bounded by `timeout_s` between reads only.
- `models.<m>.deadline_s` (transcription and translation): the longest the gateway works on one request
  across all its attempts and failovers, from when its routes are first tried (after the upload was spooled
  and validated: a slow uploader is `server.body_timeout_s`'s). Past it the attempt in flight is cancelled,
  which says nothing of its backend (outlier ejection records a cancelled attempt as undecided), and the
  client gets a 504 with `x-should-retry: false`, since the same request would take as long again. Nothing
  reached the client, so nothing is billed. A speech stream has no such deadline: its length is the audio's.

Both are off by default. Each is applied in one place, around what it bounds, never per adapter: the
cancellation reaches the adapter as a client's disconnect does, and every adapter already closes its engine
call on that.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from gateway.config import Backend
from gateway.errors import GatewayError, Reason, UpstreamTimeoutError
from gateway.models import Model

log = logging.getLogger("gateway.deadlines")
T = TypeVar("T")

DEADLINE = "deadline"
"""The `error` of a request stopped by its model's deadline_s in the access log: the gateway's own limit,
not a backend failure (so not a `Reason`)."""


async def first_byte(backend: Backend, attempt: Awaitable[T]) -> T:
    """`attempt` (a speech call and its first chunk, which closes its stream on any failure, cancellation
    included), failed as `backend`'s upstream timeout if it takes longer than its first_byte_timeout_s."""
    seconds = backend.timeouts.first_byte
    return await _within(seconds, attempt, lambda: UpstreamTimeoutError(
        f"Backend '{backend.name}' sent no audio within its first-byte timeout ({seconds:g} s).",
        reason=Reason.TIMEOUT))


async def within_deadline(model: Model, work: Awaitable[T], request_id: str | None = None) -> T:
    """`work` (all of a transcription's attempts), cancelled past `model`'s deadline_s, then a 504."""
    seconds = model.deadline_s

    def stopped() -> GatewayError:
        log.warning("request %s: stopped at the deadline of model '%s' (deadline_s: %g)", request_id,
                    model.name, seconds)
        return UpstreamTimeoutError(f"The request to model `{model.name}` did not complete within its deadline "
                                    f"of {seconds:g} seconds and was stopped.", reason=DEADLINE, should_retry=False)

    return await _within(seconds, work, stopped)


async def _within(seconds: float | None, work: Awaitable[T], error: Callable[[], GatewayError]) -> T:
    """`work`, or `error()` once it took `seconds` (None: no bound)."""
    if seconds is None:
        return await work
    try:
        async with asyncio.timeout(seconds) as timer:
            return await work
    except TimeoutError:
        if not timer.expired():
            raise  # not ours (an adapter's own timeout, which it turns into its error; defensive)
        raise error() from None
