"""Wyoming, Home Assistant's voice protocol (Piper speech, faster-whisper transcription), over TCP or a Unix socket.

The framing is the `wyoming` package's own (`async_read_event` / `async_write_event`), with a fresh
connection per request (faster-whisper hangs up after one transcript). Speech: `synthesize` with the
voice table's `{name, speaker}`, then audio-start / audio-chunk... / audio-stop, relayed as the chunks
arrive as raw PCM in the engine's format (the gateway encodes, resamples and time-stretches: Wyoming
has no speed or format). Transcription: `transcribe` {name: route model, language}, audio-start, the
upload as 16 kHz mono s16le chunks sent as they are decoded (a second at a time, so memory is bounded
by that, not by the file), audio-stop; the `transcript` is text only: one segment spanning the clip, no word
timestamps claimed (docs/backends.md: timings). No translation (the protocol has no such field).

Live transcripts (`transcribe_live`): the same exchange, each `transcript-chunk` yielded as it comes
(gateway/adapters/wyoming_live.py); `live_transcript` is learnt from each `info` (supports_transcript_streaming).

The engine has no status codes. A refused connection is UpstreamError "connect"; an `error` event is
"engine" (its text redacted like every engine's), except Piper's unknown voice (code VoiceNotFoundError),
the client's 400 on `voice`; EOF before audio-stop / transcript is "disconnect"; no event within
`timeout_s` (or no connection within `connect_timeout_s`) is UpstreamTimeoutError. `describe` -> `info`
(never billed) is the readiness probe and says which tasks a server offers (Piper: tts, faster-whisper: asr).

Backend settings: `url` (tcp://host:port or unix:///path), `timeout_s`, `connect_timeout_s`, and
optionally `tasks: [speech]` or `[transcription]` so routes for the other task skip this backend.

asyncio internal relied on (pinned by tests/adapters/test_wyoming.py::test_asyncio_internals):
`StreamReader._buffer`, the bytes received and not read yet, which a reset makes `readline` refuse.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import replace
from typing import Any, ClassVar
from urllib.parse import urlparse

import aiohttp
from wyoming.asr import Transcribe
from wyoming.asr import Transcript as WyomingTranscript
from wyoming.audio import AudioChunk, AudioChunkConverter, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event, async_read_event, async_write_event
from wyoming.info import Describe, Info
from wyoming.tts import Synthesize, SynthesizeVoice

from gateway.adapters.base import (
    SPEECH,
    TRANSCRIPTION,
    AudioStream,
    Capabilities,
    SpeechJob,
    TranscriptionJob,
    check_options,
)
from gateway.adapters.redact import redact
from gateway.adapters.wyoming_live import heard_live, streams_transcripts
from gateway.audio.decode import PcmChunks
from gateway.audio.formats import pcm
from gateway.config import Backend
from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    Reason,
    UnsupportedError,
    UpstreamError,
    UpstreamTimeoutError,
)
from gateway.transcript import Segment, Transcript

log = logging.getLogger(__name__)

ASR_RATE, ASR_WIDTH, ASR_CHANNELS = 16_000, 2, 1
"""What faster-whisper converts every chunk to anyway; sending it avoids resampling on the engine."""
SAMPLES_PER_CHUNK = 4096
_UNKNOWN_VOICE = frozenset({"VoiceNotFoundError"})
"""Error codes (wyoming-piper: the exception's class name) that mean the voice asked for does not exist there."""
_UNKNOWN_VOICE_TEXT = "Unable to find or download voice"
"""wyoming-piper's ValueError for a voice in its catalogue that it cannot fetch."""
_PROGRAMS = {SPEECH: "tts", TRANSCRIPTION: "asr"}
_OPTIONS = frozenset({"tasks"})


class _Connection:
    """One request's connection. Every write and every read waits at most `timeout` seconds."""

    def __init__(self, backend: Backend, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float, open_set: set[_Connection]) -> None:
        self.backend, self.reader, self.writer, self.timeout = backend, reader, writer, timeout
        self.closed = False
        self._open_set = open_set
        open_set.add(self)

    async def send(self, event: Event) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await async_write_event(event, self.writer)
        except TimeoutError:
            raise _timed_out(self.backend) from None
        except OSError:
            raise _dropped(self.backend) from None

    async def receive(self) -> Event:
        """The next event; an `error` event, EOF and silence raise."""
        try:
            async with asyncio.timeout(self.timeout):
                event = await async_read_event(self.reader)
        except TimeoutError:
            raise _timed_out(self.backend) from None
        except OSError:  # reset: what the engine said before is buffered still, but the reader refuses it
            event = await _buffered_event(self.reader)
        except EOFError:  # EOF inside an event (IncompleteReadError)
            event = None
        if event is None:  # EOF (or a line that is not JSON, which the package reads as EOF)
            raise _dropped(self.backend)
        if Error.is_type(event.type):
            raise _engine_error(self.backend, event)
        return event

    def spoke(self) -> bool:
        """Whether the engine sent something (or hung up) that was not read yet. Read it before writing
        more: a write after its hang-up resets the connection, which discards what it said."""
        return bool(self.reader._buffer) or self.reader.at_eof()  # type: ignore[attr-defined]

    def close(self, *, abort: bool) -> None:
        """Close at once; `abort` drops unsent bytes (an engine that stopped reading cannot hold us)."""
        self._open_set.discard(self)
        if not self.closed:
            self.closed = True
            if abort:
                self.writer.transport.abort()
            else:
                self.writer.close()


class _Audio(AsyncIterator[bytes]):
    """A synthesis's PCM as it arrives, until audio-stop. Errors raised here may come after the client's
    first byte (the core applies its rule); `aclose` (the client went away) closes the connection."""

    def __init__(self, conn: _Connection, start: AudioStart, first: AudioChunk | None) -> None:
        self._conn, self._pending = conn, first
        self._converter = AudioChunkConverter(rate=start.rate, width=2, channels=start.channels)
        self.done = False

    async def __anext__(self) -> bytes:
        if self.done:
            raise StopAsyncIteration
        if self._conn.closed:  # the adapter was shut down mid-stream
            raise UpstreamError(f"Backend '{self._conn.backend.name}' is shut down.", reason=Reason.CLOSED)
        try:
            while True:
                chunk, self._pending = self._pending, None
                if chunk is not None and (audio := self._convert(chunk)):
                    return audio
                event = await self._conn.receive()
                if AudioStop.is_type(event.type):
                    self.done = True
                    self._conn.close(abort=False)
                    raise StopAsyncIteration
                if AudioChunk.is_type(event.type):
                    self._pending = _parse(self._conn.backend, AudioChunk.from_event, event)
        except StopAsyncIteration:
            raise
        except BaseException:
            self._conn.close(abort=True)
            raise

    def _convert(self, chunk: AudioChunk) -> bytes:
        """s16 in the stream's first rate and channels (Piper's chunks already are: no work)."""
        try:
            return self._converter.convert(chunk).audio
        except Exception:  # audioop on a format it cannot convert
            raise _bad_response(self._conn.backend, "sent audio it described wrongly") from None

    async def aclose(self) -> None:
        self._conn.close(abort=not self.done)


class WyomingAdapter:
    kind: ClassVar[str] = "wyoming"
    capabilities = Capabilities(tasks=frozenset({SPEECH, TRANSCRIPTION}), word_timestamps=False)  # text only

    def __init__(self, backend: Backend, http: aiohttp.ClientSession) -> None:
        self.backend = backend
        self._address = _address(backend)
        tasks = _tasks(backend)
        if tasks != type(self).capabilities.tasks:  # this backend only: routes for other tasks skip it
            self.capabilities = replace(type(self).capabilities, tasks=tasks)
        self._offers: frozenset[str] | None = None
        """Tasks the server has a program for, from its last `info`; None until asked."""
        self._connections: set[_Connection] = set()

    async def _connect(self, event_timeout: float | None = None) -> _Connection:
        name = self.backend.name
        try:
            async with asyncio.timeout(self.backend.timeouts.connect):
                if isinstance(self._address, str):
                    reader, writer = await asyncio.open_unix_connection(self._address)
                else:
                    reader, writer = await asyncio.open_connection(*self._address)
        except (TimeoutError, OSError) as exc:
            self._offers = None  # maybe another server comes up there: ask it again
            if isinstance(exc, TimeoutError):
                raise _timed_out(self.backend) from None
            raise UpstreamError(f"Backend '{name}' is unreachable.", reason=Reason.CONNECT) from None
        return _Connection(self.backend, reader, writer, event_timeout or self.backend.timeouts.read,
                           self._connections)

    async def _describe(self, event_timeout: float | None = None) -> frozenset[str]:
        conn = await self._connect(event_timeout)
        try:
            await conn.send(Describe().event())
            while not Info.is_type((event := await conn.receive()).type):
                pass
        except BaseException:
            conn.close(abort=True)
            raise
        conn.close(abort=False)
        data = event.data if isinstance(event.data, Mapping) else {}
        self._offers = frozenset(task for task, key in _PROGRAMS.items() if data.get(key))
        streams = streams_transcripts(data.get("asr"))
        if streams != self.capabilities.live_transcript:
            self.capabilities = replace(self.capabilities, live_transcript=streams)
        return self._offers

    async def _require(self, task: str) -> None:
        """Fail fast (and over to the next route) when the server has no program for `task`: a
        Wyoming server ignores events it does not know, so it would never answer."""
        offers = self._offers if self._offers is not None else await self._describe()
        if task not in offers:
            what = "text-to-speech" if task == SPEECH else "speech-to-text"
            raise UpstreamError(f"Backend '{self.backend.name}' offers no {what} program.", reason=Reason.ENGINE,
                                should_retry=False)

    async def ready(self) -> bool:
        """`describe` answered with an `info` that offers one of this backend's tasks. Never synthesizes."""
        try:
            offers = await self._describe(self.backend.timeouts.connect)
        except GatewayError:
            return False
        return bool(offers & self.capabilities.tasks)

    async def synthesize(self, job: SpeechJob) -> AudioStream:
        await self._require(SPEECH)
        conn = await self._connect()
        try:
            voice = SynthesizeVoice(name=job.voice.id, speaker=job.voice.speaker)
            await conn.send(Synthesize(text=job.input, voice=voice).event())
            start, first = await self._audio_start(conn)
        except BaseException:
            conn.close(abort=True)
            raise
        return AudioStream(pcm(start.rate, start.channels, 2), _Audio(conn, start, first))

    async def _audio_start(self, conn: _Connection) -> tuple[AudioStart, AudioChunk | None]:
        """The stream's format, from audio-start (or a first audio-chunk, which carries it too)."""
        while True:
            event = await conn.receive()
            if AudioStart.is_type(event.type):
                return _parse(self.backend, AudioStart.from_event, event), None
            if AudioChunk.is_type(event.type):
                chunk = _parse(self.backend, AudioChunk.from_event, event)
                return AudioStart(chunk.rate, chunk.width, chunk.channels), chunk
            if AudioStop.is_type(event.type):
                raise _bad_response(self.backend, "sent no audio")

    @asynccontextmanager
    async def _asr(self, job: TranscriptionJob) -> AsyncIterator[tuple[_Connection, bytes, PcmChunks]]:
        """A connection for `job`'s transcription, its first decoded chunk and the rest. Afterwards the connection
        is aborted (unless the caller closed it after a whole exchange) and the decoding stopped."""
        if job.task == "translate":  # the core filters on capabilities first; this is the backstop
            raise UnsupportedError(f"Backend '{self.backend.name}' cannot translate; Wyoming only transcribes.",
                                   param="model", code="unsupported_task")
        await job.upload.measured()  # decoding waits for the measurement: a bomb is refused undecoded
        decoded = PcmChunks(job.upload.view(), sample_rate=ASR_RATE, max_seconds=job.max_audio_seconds,
                            workers=job.upload.workers)
        try:
            first = await anext(decoded)  # an undecodable upload is a 400 before the engine is contacted
            await self._require(TRANSCRIPTION)
            conn = await self._connect()
            try:
                yield conn, first, decoded
            finally:
                conn.close(abort=True)  # a no-op after the caller's clean close
        finally:
            await decoded.aclose()

    async def transcribe(self, job: TranscriptionJob) -> Transcript:
        async with self._asr(job) as (conn, first, decoded):
            try:
                await self._send_audio(conn, job, first, decoded)
            except UpstreamError as exc:
                if exc.reason != "disconnect":
                    raise
                # the engine hung up while we were sending: it may have said why first
            result = await self._transcript(conn)
            conn.close(abort=False)
        text = result.text.strip()
        segments = (Segment(0.0, decoded.seconds, text),) if text else ()
        return Transcript(text, result.language or job.language, decoded.seconds, segments, decoded=True)

    async def _send_audio(self, conn: _Connection, job: TranscriptionJob, first: bytes, rest: PcmChunks) -> None:
        await conn.send(Transcribe(name=job.model or None, language=job.language).event())
        await conn.send(AudioStart(ASR_RATE, ASR_WIDTH, ASR_CHANNELS).event())
        async with aclosing(_audio_events(first, rest)) as audio:
            async for event in audio:
                if conn.spoke():  # before the audio ended: an error event or a hang-up raises here
                    await conn.receive()
                await conn.send(event)

    async def _transcript(self, conn: _Connection) -> WyomingTranscript:
        """The final `transcript` (streaming servers send transcript-start/chunks first: skipped)."""
        while not WyomingTranscript.is_type((event := await conn.receive()).type):
            pass
        result = _parse(self.backend, WyomingTranscript.from_event, event)
        if not isinstance(result.text, str):
            raise _bad_response(self.backend, "sent a malformed transcript")
        return result

    async def transcribe_live(self, job: TranscriptionJob) -> AsyncIterator[str]:
        """The transcript as the engine streams it (base.LiveTranscriber; gateway/adapters/wyoming_live.py), the
        final `transcript` once from a server that does not stream. `aclose` aborts the connection."""
        async with self._asr(job) as (conn, first, decoded):
            request = [Transcribe(name=job.model or None, language=job.language).event(),
                       AudioStart(ASR_RATE, ASR_WIDTH, ASR_CHANNELS).event()]
            async with aclosing(_audio_events(first, decoded)) as audio, \
                    aclosing(heard_live(self.backend, conn, request, audio)) as pieces:
                async for piece in pieces:
                    yield piece
            conn.close(abort=False)

    async def aclose(self) -> None:
        for conn in list(self._connections):
            conn.close(abort=True)


async def _audio_events(first: bytes, rest: PcmChunks) -> AsyncIterator[Event]:
    """The decoded upload as audio-chunk events of SAMPLES_PER_CHUNK, then audio-stop."""
    step, audio = SAMPLES_PER_CHUNK * ASR_WIDTH * ASR_CHANNELS, first
    while audio:
        for offset in range(0, len(audio), step):
            yield AudioChunk(ASR_RATE, ASR_WIDTH, ASR_CHANNELS, audio[offset:offset + step]).event()
        audio = await anext(rest, b"")
    yield AudioStop().event()


async def _buffered_event(reader: asyncio.StreamReader) -> Event | None:
    """The next complete event among the bytes that arrived before the connection was reset (an engine
    that hangs up on a bad `transcribe` while audio is still coming resets it), or None."""
    buffered: bytearray = reader._buffer  # type: ignore[attr-defined]
    copy = asyncio.StreamReader()
    copy.feed_data(bytes(buffered))
    copy.feed_eof()
    try:
        event = await async_read_event(copy)
    except (EOFError, ValueError):
        return None
    del buffered[: len(buffered) - len(copy._buffer)]  # type: ignore[attr-defined]
    return event


def _address(backend: Backend) -> tuple[str, int] | str:
    """(host, port) for tcp://host:port, the path for unix:///path."""
    url, where = backend.url or "", f"backends.{backend.name}.url"
    parsed = urlparse(url)
    if parsed.scheme == "unix" and (parsed.path or parsed.netloc):
        return parsed.netloc + parsed.path
    if parsed.scheme != "tcp":
        raise ValueError(f"{where}: kind 'wyoming' needs tcp://host:port (or unix:///path), got {url!r}")
    try:
        port = parsed.port
    except ValueError:  # not a number, or out of range
        port = None
    if not parsed.hostname or not port:
        raise ValueError(f"{where}: expected tcp://host:port, got {url!r}")
    return parsed.hostname, port


def _tasks(backend: Backend) -> frozenset[str]:
    check_options(backend, _OPTIONS)
    raw = backend.options.get("tasks")
    if raw is None:
        return WyomingAdapter.capabilities.tasks
    if not isinstance(raw, list) or not raw or not all(t in _PROGRAMS for t in raw):
        raise ValueError(f"backends.{backend.name}.tasks: expected a non-empty list of speech, transcription")
    return frozenset(raw)


def _parse(backend: Backend, from_event: Any, event: Event) -> Any:
    """`from_event` of the package's event class, a malformed event being the engine's fault."""
    try:
        parsed = from_event(event)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise _bad_response(backend, f"sent a malformed {event.type} event") from None
    if isinstance(parsed, (AudioStart, AudioChunk)):
        _check_format(backend, parsed)
    return parsed


def _check_format(backend: Backend, fmt: AudioStart | AudioChunk) -> None:
    valid = (all(isinstance(v, int) and not isinstance(v, bool) for v in (fmt.rate, fmt.width, fmt.channels))
             and 1_000 <= fmt.rate <= 384_000 and 1 <= fmt.width <= 4 and 1 <= fmt.channels <= 8)
    if valid and isinstance(fmt, AudioChunk):
        valid = isinstance(fmt.audio, bytes) and len(fmt.audio) % (fmt.width * fmt.channels) == 0
    if not valid:
        raise _bad_response(backend, "described its audio wrongly")


def _timed_out(backend: Backend) -> UpstreamTimeoutError:
    return UpstreamTimeoutError(f"Backend '{backend.name}' did not answer in time.", reason=Reason.TIMEOUT)


def _dropped(backend: Backend) -> UpstreamError:
    return UpstreamError(f"Backend '{backend.name}' closed the connection unexpectedly.", reason=Reason.DISCONNECT)


def _bad_response(backend: Backend, what: str) -> UpstreamError:
    return UpstreamError(f"Backend '{backend.name}' {what}.", reason=Reason.BAD_RESPONSE)


def _engine_error(backend: Backend, event: Event) -> GatewayError:
    """The engine's own words (Piper: the exception text, code = its class name), redacted. Piper's unknown voice
    (VoiceNotFoundError, text = the voice's name) is the request's fault: a 400 on `voice`, which the SDK does not
    retry; any other complaint is the engine's, a 502."""
    data = event.data if isinstance(event.data, Mapping) else {}
    text, code = redact(backend, data.get("text")), redact(backend, data.get("code"), 64)
    log.warning("backend %s: engine error %s: %s", backend.name, code or "-", text)
    if code in _UNKNOWN_VOICE or text.startswith(_UNKNOWN_VOICE_TEXT):
        return InvalidRequestError(f"Backend '{backend.name}' does not have the requested voice.", param="voice",
                                   code="invalid_value", reason=Reason.BACKEND_REJECTED)
    detail = f": {text}" if text else ""
    return UpstreamError(f"Backend '{backend.name}' reported an error{detail}", reason=Reason.ENGINE)
