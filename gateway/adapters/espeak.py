"""eSpeak NG inside the gateway: text to raw PCM, streamed as the engine produces it.

libespeak-ng (with its data, from the `espeakng-loader` wheel) runs through ctypes in synchronous
mode: `espeak_Synth` blocks and calls our callback once per `BUFFER_MS` of audio; the callback hands
each buffer to the event loop (`call_soon_threadsafe`) and returns 1 to abort once the consumer left.

Why a thread, not a subprocess: ctypes releases the GIL for the whole `espeak_Synth` call (the
callback re-takes it for microseconds per buffer), so synthesis does not stall the event loop. eSpeak
runs ~1000x faster than real time, so one worker is plenty, and its global state (one voice, rate and
callback per process) asks for one worker thread plus a process-wide lock anyway. In-process,
streaming and aborting are immediate, the data loads once, and there is no process start or pipe
framing per request; a subprocess would only buy crash isolation and more cores. Output is not
throttled to slow clients: holding the one engine for them would stall everyone else, and 4096
characters are at most a few minutes (~10 MB) of audio.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib.util
import logging
import re
import threading
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import ClassVar

import aiohttp

from gateway.adapters.base import SPEECH, AudioStream, Capabilities, SpeechJob, TranscriptionJob, check_options
from gateway.adapters.engine_thread import EngineThread
from gateway.audio.formats import pcm
from gateway.config import Backend
from gateway.errors import GatewayError, InvalidRequestError, Reason, UnsupportedError
from gateway.transcript import Transcript

log = logging.getLogger(__name__)

DEFAULT_RATE, MIN_RATE, MAX_RATE = 175, 80, 450
"""eSpeak's rate parameter, in words per minute."""
BUFFER_MS = 100
MAX_CHUNK = 65_536
_SYNCHRONOUS, _DONT_EXIT, _CHARS_UTF8, _POS_CHARACTER, _PARAM_RATE = 2, 0x8000, 1, 1, 1
_C = ctypes
_CALLBACK = _C.CFUNCTYPE(_C.c_int, _C.POINTER(_C.c_short), _C.c_int, _C.c_void_p)
_VOICE_NAME = re.compile(r"[A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)?(?:\+[A-Za-z0-9_ -]+)?")
_CONTROL = {c: " " for c in range(32) if chr(c) not in "\t\n"}
_LOCK = threading.Lock()
_ENGINE: _Engine | None = None


def unavailable_reason() -> str | None:
    """Why this adapter cannot run here, or None when it can."""
    if importlib.util.find_spec("espeakng_loader") is None:
        return "the 'espeakng-loader' package is not installed (pip install 'openai-audio-gateway[embedded-lite]')"
    return None


class _Voice(_C.Structure):
    _fields_ = [("name", _C.c_char_p), ("languages", _C.c_void_p), ("identifier", _C.c_char_p),
                *((f, _C.c_ubyte) for f in ("gender", "age", "variant", "xx1")),
                ("score", _C.c_int), ("spare", _C.c_void_p)]


class _PcmStream(AsyncIterator[bytes]):
    """One synthesis as an async iterator of PCM chunks; `aclose` makes the engine abort."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self._error: BaseException | None = None
        self._done = self.cancelled = False
        self.produced = 0  # bytes the engine made (written by the worker)
        self.worker: asyncio.Future[None] | None = None

    def push(self, chunk: bytes) -> bool:
        """From the worker: queue a chunk; False when nobody can receive it any more."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, chunk)
        except RuntimeError:  # the loop is closed
            self.cancelled = True
            return False
        self.produced += len(chunk)
        return True

    def end(self, error: BaseException | None) -> None:
        """On the loop, after the worker's last push: the end, or the error synthesis ended with."""
        self._queue.put_nowait(error)

    async def __anext__(self) -> bytes:
        """What the engine made so far (at least one buffer, at most about MAX_CHUNK bytes)."""
        parts: list[bytes] = []
        size = 0
        while not self._done and size < MAX_CHUNK and not (parts and self._queue.empty()):
            item = self._queue.get_nowait() if parts else await self._queue.get()
            if isinstance(item, bytes):
                parts.append(item)
                size += len(item)
            else:  # the end: None, or the error the synthesis ended with
                self._done, self._error = True, item
        if parts:
            return b"".join(parts)
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.cancelled = self._done = True


class _Engine:
    """The process's one libespeak-ng. Built and used in worker threads only, under `_LOCK`."""

    def __init__(self) -> None:
        import espeakng_loader

        self.data = Path(espeakng_loader.get_data_path())
        lib = _C.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [_C.c_int, _C.c_int, _C.c_char_p, _C.c_int]
        lib.espeak_SetVoiceByName.argtypes = [_C.c_char_p]
        lib.espeak_SetParameter.argtypes = [_C.c_int, _C.c_int, _C.c_int]
        lib.espeak_Synth.argtypes = [_C.c_void_p, _C.c_size_t, _C.c_uint, _C.c_int, _C.c_uint, _C.c_uint,
                                     _C.c_void_p, _C.c_void_p]
        lib.espeak_ListVoices.argtypes = [_C.c_void_p]
        lib.espeak_ListVoices.restype = _C.POINTER(_C.POINTER(_Voice))
        self.sample_rate = lib.espeak_Initialize(_SYNCHRONOUS, BUFFER_MS, str(self.data).encode(), _DONT_EXIT)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate})")
        self._callback = _CALLBACK(self._on_audio)  # referenced for as long as the library may call it
        lib.espeak_SetSynthCallback(self._callback)
        self.lib = lib
        self.active: _PcmStream | None = None
        self.voices = self._list_voices()
        variants = self.data / "voices" / "!v"
        listed = variants.iterdir() if variants.is_dir() else ()
        self.variants = frozenset(p.name for p in listed if p.is_file())
        """Voice variants ("m3", "f2", "klatt"), listed once at load: no file system call per request."""

    def _list_voices(self) -> dict[str, str]:
        """Lower-cased identifier ("gmw/en-us"), file name ("en-us") or language ("en-gb") -> identifier."""
        keys: dict[str, str] = {}
        languages: list[tuple[int, int, str, str]] = []
        entries = self.lib.espeak_ListVoices(None)
        i = 0
        while entries[i]:
            voice = entries[i].contents
            ident = voice.identifier.decode()
            keys.setdefault(ident.lower(), ident)
            keys.setdefault(ident.rsplit("/", 1)[-1].lower(), ident)
            pointer = voice.languages  # (priority byte, NUL-terminated language)*, then a 0 byte
            while priority := _C.string_at(pointer, 1)[0]:
                language = _C.string_at(pointer + 1)
                languages.append((priority, i, language.decode().lower(), ident))
                pointer += len(language) + 2
            i += 1
        for _, _, language, ident in sorted(languages):  # each language's best voice comes first
            keys.setdefault(language, ident)
        return keys

    def resolve(self, name: str) -> str | None:
        """The identifier[+variant] eSpeak should load for `name` ("en-us", "en-gb+m3"), or None."""
        if not _VOICE_NAME.fullmatch(name):
            return None
        base, _, variant = name.partition("+")
        ident = self.voices.get(base.lower())
        if ident is None or not variant:
            return ident
        variant = f"m{variant}" if variant.isdigit() else variant
        return f"{ident}+{variant}" if variant in self.variants else None

    def _on_audio(self, wav: _C._Pointer[_C.c_short], samples: int, events: int | None) -> int:
        try:
            stream = self.active
            if stream is None or stream.cancelled:
                return 1
            return int(bool(wav) and samples > 0 and not stream.push(_C.string_at(wav, samples * 2)))
        except BaseException:  # an exception must not cross into C
            log.exception("eSpeak NG synth callback failed")
            return 1

    def speak(self, stream: _PcmStream, text: str, voice: str, rate: int) -> None:
        """Synthesize `text` into `stream`, blocking this (worker) thread until done or aborted."""
        with _LOCK:
            if stream.cancelled:
                return
            if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise InvalidRequestError(f"Voice '{voice}' is not available on this backend.",
                                          param="voice", code="invalid_value")
            self.lib.espeak_SetParameter(_PARAM_RATE, rate, 0)
            data = text.encode()
            self.active = stream
            try:
                status = self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8,
                                               None, None)
            finally:
                self.active = None
            if status != 0 and not stream.cancelled:
                raise RuntimeError(f"espeak_Synth failed ({status})")


def _load_engine() -> _Engine:
    global _ENGINE
    with _LOCK:
        if _ENGINE is None:
            _ENGINE = _Engine()
        return _ENGINE


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
        self._streams: set[_PcmStream] = set()
        self._thread = EngineThread(backend, "espeak", _load_engine)  # the library loads in a few ms, off the loop

    async def ready(self) -> bool:
        return await self._thread.ready()

    async def synthesize(self, job: SpeechJob) -> AudioStream:
        engine = await self._thread.loaded()
        voice = engine.resolve(job.voice.id)
        if voice is None:
            raise InvalidRequestError(f"Voice '{job.voice.id}' is not available on this backend.",
                                      param="voice", code="invalid_value")
        low, high = self.capabilities.native_speed or (1.0, 1.0)
        applied = low <= job.speed <= high
        rate = min(MAX_RATE, max(MIN_RATE, round(DEFAULT_RATE * (job.speed if applied else 1.0))))
        loop = asyncio.get_running_loop()
        stream = _PcmStream(loop)
        stream.worker = self._thread.submit(engine.speak, stream, job.input.translate(_CONTROL), voice, rate)
        self._streams.add(stream)
        stream.worker.add_done_callback(partial(self._finished, stream))
        return AudioStream(format=pcm(engine.sample_rate), chunks=stream, speed_applied=applied)

    def _finished(self, stream: _PcmStream, worker: asyncio.Future[None]) -> None:
        """On the loop, after the worker's last chunk: end the stream, with the error if there was one."""
        self._streams.discard(stream)
        error = self._thread.error("is shut down", Reason.CLOSED) if worker.cancelled() else worker.exception()
        if error is not None and not isinstance(error, GatewayError):
            log.error("backend %s: eSpeak NG synthesis failed", self.backend.name, exc_info=error)
            error = self._thread.error("failed", Reason.ENGINE)
        stream.end(error)

    async def transcribe(self, job: TranscriptionJob) -> Transcript:
        raise UnsupportedError(f"Backend '{self.backend.name}' cannot transcribe; it synthesizes speech.",
                               param="model", code="unsupported_task")

    async def aclose(self) -> None:
        for stream in list(self._streams):
            stream.cancelled = True
        await self._thread.aclose()
