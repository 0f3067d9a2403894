"""eSpeak NG, in a process of its own: text to raw PCM, streamed as the engine produces it.

Why a process: libespeak-ng is GPL-3.0-or-later, and the project's rule is that GPL engines run in
their own process, never imported or loaded into the gateway's (the gateway's licence stays its
own for those who embed it). Each backend starts one child (gateway/engines/espeak_child.py, the
`espeakng-loader` wheel's library and data through ctypes) and talks to it over pipes with
length-prefixed frames (gateway/adapters/espeak_process.py). What that costs, measured on this
2-core machine against the former in-process engine (docs/backends.md has the figures): a process
start once per backend (40-140 ms to ready instead of a 6-25 ms library load, off the event loop),
and per request the framing: first audio 0.6-1.6 ms after the request instead of 0.5-0.6 ms, the
same CPU in all within 5 %, the same throughput within the load's noise. Three quarters of that CPU
has left the gateway's process, which now only reads frames. eSpeak's global state (one voice, rate
and callback per process) means one synthesis at a time per child: requests queue there, in order,
as they did on the former engine thread.

Everything else is as before: audio streams as eSpeak makes it (a frame per 100 ms buffer); a
client that leaves stops the child's synthesis at its next buffer; voices and +variants are resolved
here, before any audio, from the list the child sends when it starts. A child that dies fails its
requests with a 502 and is started again on next use (the readiness probe's, at the latest); one
that cannot start is retried after a backoff, so a broken install costs no busy loop. Output is not
throttled to slow clients: holding the one engine for them would stall everyone else, and 4096
characters are at most a few minutes (~10 MB) of audio.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import re
import time
from typing import ClassVar

import aiohttp

from gateway.adapters.base import SPEECH, AudioStream, Capabilities, SpeechJob, TranscriptionJob, check_options
from gateway.adapters.espeak_process import EspeakProcess
from gateway.audio.formats import pcm
from gateway.config import Backend
from gateway.engine_process import BACKOFF_S
from gateway.errors import InvalidRequestError, Reason, UnsupportedError, UpstreamError
from gateway.transcript import Transcript

log = logging.getLogger(__name__)

DEFAULT_RATE, MIN_RATE, MAX_RATE = 175, 80, 450
"""eSpeak's rate parameter, in words per minute."""
RESTART_BACKOFF_S = BACKOFF_S
"""After a failed start, the next try waits this long, doubling up to the second figure; reset by a start (the
supervised engines' backoff, gateway/engine_process.py)."""
_VOICE_NAME = re.compile(r"[A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)?(?:\+[A-Za-z0-9_ -]+)?")
_CONTROL = {c: " " for c in range(32) if chr(c) not in "\t\n"}


def unavailable_reason() -> str | None:
    """Why this adapter cannot run here, or None when it can."""
    if importlib.util.find_spec("espeakng_loader") is None:
        return "the 'espeakng-loader' package is not installed (pip install 'openai-audio-gateway[embedded-lite]')"
    return None


def resolve(engine: EspeakProcess, name: str) -> str | None:
    """The identifier[+variant] eSpeak should load for `name` ("en-us", "en-gb+m3"), or None; from the
    voices and variants the child listed when it started."""
    if not _VOICE_NAME.fullmatch(name):
        return None
    base, _, variant = name.partition("+")
    ident = engine.voices.get(base.lower())
    if ident is None or not variant:
        return ident
    variant = f"m{variant}" if variant.isdigit() else variant
    return f"{ident}+{variant}" if variant in engine.variants else None


class EspeakAdapter:
    """Speech with eSpeak NG; `job.voice.id` is an eSpeak voice or language, optionally +variant."""

    kind: ClassVar[str] = "espeak"
    capabilities = Capabilities(
        tasks=frozenset({SPEECH}), native_speed=(0.5, 2.5)  # 87..437 of 80..450 wpm
    )

    def __init__(self, backend: Backend, http: aiohttp.ClientSession) -> None:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        check_options(backend, ())
        self.backend = backend
        self.closed = False
        self.process: EspeakProcess | None = None
        """The running child, once started (tests read its pid)."""
        self._starting: asyncio.Task[EspeakProcess] | None = None
        self._retry_at, self._backoff = 0.0, 0.0
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # built outside a loop: started on first use
            return
        self._starting = asyncio.create_task(self._start())  # at once, so it is ready before the first request
        self._starting.add_done_callback(lambda task: task.cancelled() or task.exception())

    def _error(self, what: str, reason: Reason) -> UpstreamError:
        return UpstreamError(f"Backend '{self.backend.name}' {what}.", reason=reason)

    async def _start(self) -> EspeakProcess:
        try:
            process = await EspeakProcess.start(self.backend.name)
        except Exception as exc:
            low, high = RESTART_BACKOFF_S
            self._backoff = min(high, max(low, 2 * self._backoff))
            self._retry_at = time.monotonic() + self._backoff
            log.error("backend %s: eSpeak NG failed to start (next try in %.1f s)", self.backend.name,
                      self._backoff, exc_info=exc)
            raise self._error("failed to start", Reason.ENGINE) from None
        finally:
            self._starting = None
        if self.closed:
            await process.aclose()
            raise self._error("is shut down", Reason.CLOSED)
        self.process, self._backoff = process, 0.0
        return process

    async def _engine(self) -> EspeakProcess:
        """The running child: started (again) if there is none; a 502 while it cannot start or once closed."""
        if self.closed:
            raise self._error("is shut down", Reason.CLOSED)
        if self.process is not None and not self.process.gone:
            return self.process
        if self._starting is None:
            if time.monotonic() < self._retry_at:
                raise self._error("failed to start", Reason.ENGINE)
            self._starting = asyncio.create_task(self._start())
        return await asyncio.shield(self._starting)

    async def ready(self) -> bool:
        try:
            await self._engine()
        except UpstreamError:
            return False
        return True

    async def synthesize(self, job: SpeechJob) -> AudioStream:
        engine = await self._engine()
        voice = resolve(engine, job.voice.id)
        if voice is None:
            raise InvalidRequestError(f"Voice '{job.voice.id}' is not available on this backend.",
                                      param="voice", code="invalid_value")
        low, high = self.capabilities.native_speed or (1.0, 1.0)
        applied = low <= job.speed <= high
        rate = min(MAX_RATE, max(MIN_RATE, round(DEFAULT_RATE * (job.speed if applied else 1.0))))
        stream = engine.speak(job.input.translate(_CONTROL), voice, rate, job.voice.id)
        return AudioStream(format=pcm(engine.sample_rate), chunks=stream, speed_applied=applied)

    async def transcribe(self, job: TranscriptionJob) -> Transcript:
        raise UnsupportedError(f"Backend '{self.backend.name}' cannot transcribe; it synthesizes speech.",
                               param="model", code="unsupported_task")

    async def aclose(self) -> None:
        self.closed = True
        if self._starting is not None:
            self._starting.cancel()
        if self.process is not None:
            await self.process.aclose()
