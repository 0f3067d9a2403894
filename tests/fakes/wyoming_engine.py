"""A double of Wyoming voice servers (wyoming-piper for speech, wyoming-faster-whisper for transcription).

Built on the `wyoming` package's own `AsyncTcpServer` and `AsyncEventHandler`, so the framing on the
wire is the real one. It listens on 127.0.0.1 (port 0) and behaves as native-engines.md section 1 says
the real servers do: `describe` -> `info` (a Piper program with a single- and a multi-speaker voice, a
faster-whisper program with one model); `synthesize` -> audio-start, audio-chunk x N (1024 samples of
22050 Hz s16le mono, Piper's default chunk), audio-stop, connection kept open; ASR: `transcribe`,
audio-start, chunks (converted to 16 kHz s16 mono as faster-whisper does), audio-stop -> `transcript`,
then hang up. Events a server does not know are ignored (it never answers them), as the real ones do.

    async with FakeWyomingEngine() as engine:   # engine.url == "tcp://127.0.0.1:<port>"
        engine.mode = "error_midstream"

Every connection is a `Session` in `sessions` with every event the client sent. `mode` selects a
failure (see MODES); `chunk_delay` slows the audio; `delay` is how long the `slow_*` modes stall.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Self

from wyoming.asr import Transcribe, Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.audio import AudioChunk, AudioChunkConverter, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import (
    AsrModel,
    AsrProgram,
    Attribution,
    Describe,
    Info,
    TtsProgram,
    TtsVoice,
    TtsVoiceSpeaker,
)
from wyoming.server import AsyncEventHandler, AsyncTcpServer
from wyoming.tts import Synthesize

RATE = 22_050  # Piper's -medium voices
TONE_HZ = 441  # 50 samples per period at 22050 Hz
SECONDS_PER_CHAR = 0.06
MIN_SECONDS = 0.5
SAMPLES_PER_CHUNK = 1024  # wyoming-piper --samples-per-chunk default
SINGLE_VOICE = "en_US-lessac-medium"
MULTI_VOICE = "en_US-libritts_r-medium"
SPEAKERS = ("p123", "p456")
ASR_MODEL = "base-int8"
TRANSCRIPT = "Turn on the living room lamp."
MODES = ("ok", "error", "error_midstream", "eof", "eof_midstream", "slow_first",
         "asr_error", "asr_error_early", "asr_eof", "asr_slow", "asr_streaming", "asr_streaming_live",
         "asr_streaming_error", "asr_streaming_eof", "asr_streaming_silent", "asr_streaming_bad",
         "asr_streaming_chatter")
"""asr_streaming*: a protocol 1.7 server (`info` says supports_transcript_streaming): transcript-start, a
transcript-chunk per word ("word "), `transcript`, transcript-stop. _live: a word per second of audio as it
arrives, the rest after audio-stop. _error / _eof / _silent / _bad: after `fail_after` chunks, an `error`
event / a hang-up / silence for `delay` s / a chunk whose text is not a string / empty chunks every 20 ms,
forever."""
_FAILING = {"asr_streaming_error", "asr_streaming_eof", "asr_streaming_silent", "asr_streaming_bad",
            "asr_streaming_chatter"}
_ATTRIBUTION = Attribution(name="rhasspy", url="https://github.com/rhasspy")


def tone(seconds: float, rate: int = RATE) -> bytes:
    """A sine tone at TONE_HZ as s16le mono."""
    samples = int(seconds * rate)
    return struct.pack(f"<{samples}h", *(int(9000 * math.sin(2 * math.pi * TONE_HZ * i / rate))
                                         for i in range(samples)))


def speech_seconds(text: str) -> float:
    return max(MIN_SECONDS, SECONDS_PER_CHAR * len(text))


def info(programs: tuple[str, ...], streaming: bool = False) -> Info:
    tts = TtsProgram(name="piper", attribution=_ATTRIBUTION, installed=True, description="Piper", version="1.6.0",
                     voices=[TtsVoice(name=SINGLE_VOICE, attribution=_ATTRIBUTION, installed=True, description=None,
                                      version=None, languages=["en_US"]),
                             TtsVoice(name=MULTI_VOICE, attribution=_ATTRIBUTION, installed=True, description=None,
                                      version=None, languages=["en_US"],
                                      speakers=[TtsVoiceSpeaker(name=s) for s in SPEAKERS])])
    asr = AsrProgram(name="faster-whisper", attribution=_ATTRIBUTION, installed=True, description="Whisper",
                     version="2.5.0", models=[AsrModel(name=ASR_MODEL, attribution=_ATTRIBUTION, installed=True,
                                                       description=None, version=None, languages=["en", "de"])],
                     supports_transcript_streaming=streaming)
    return Info(tts=[tts] if "tts" in programs else [], asr=[asr] if "asr" in programs else [])


@dataclass
class Session:
    """One client connection as the server saw it."""

    events: list[Event] = field(default_factory=list)
    pcm: bytearray = field(default_factory=bytearray)
    """ASR audio received, converted to 16 kHz s16 mono."""
    first_audio_at: float | None = None
    last_audio_at: float | None = None
    """time.monotonic() when the first / last synthesized chunk was written."""
    client_left: bool = False
    """The client closed the connection before the server was done sending."""
    ended_at: float | None = None

    @property
    def types(self) -> list[str]:
        return [e.type for e in self.events]

    def first(self, event_type: str) -> dict[str, Any] | None:
        return next((e.data for e in self.events if e.type == event_type), None)

    @property
    def ended(self) -> bool:
        return self.ended_at is not None


class _Handler(AsyncEventHandler):
    def __init__(self, engine: FakeWyomingEngine, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.engine = engine
        self.session = Session()
        self.converter = AudioChunkConverter(rate=16_000, width=2, channels=1)
        self.said = 0
        """Words of the transcript sent as transcript-chunks so far."""
        engine.sessions.append(self.session)
        engine.active += 1

    async def handle_event(self, event: Event) -> bool:
        self.session.events.append(event)
        mode = self.engine.mode
        try:
            if Describe.is_type(event.type):
                await self.write_event(info(self.engine.programs, mode.startswith("asr_streaming")).event())
                return True
            if Synthesize.is_type(event.type) and "tts" in self.engine.programs:
                return await self._speak(Synthesize.from_event(event), mode)
            if "asr" not in self.engine.programs:
                return True
            if Transcribe.is_type(event.type) and mode == "asr_error_early":
                await self.write_event(Error(text="Model 'nope' is not installed", code="ValueError").event())
                return False
            if AudioChunk.is_type(event.type):
                self.session.pcm += self.converter.convert(AudioChunk.from_event(event)).audio
                if mode == "asr_streaming_live" and len(self.session.pcm) >= (self.said + 1) * 32_000:
                    return await self._stream(self.said + 1)  # a word per second heard, as it is heard
            if AudioStop.is_type(event.type):
                return await self._transcript(mode)
        except ConnectionError:
            self.session.client_left = True
            return False
        return True

    async def _speak(self, request: Synthesize, mode: str) -> bool:
        voice = request.voice.name if request.voice else None
        if voice not in (SINGLE_VOICE, MULTI_VOICE):  # wyoming-piper's find_voice: raise VoiceNotFoundError(name)
            await self.write_event(Error(text=str(voice), code="VoiceNotFoundError").event())
            return False  # wyoming-piper re-raises after sending the error: the connection ends
        if mode == "error":
            await self.write_event(Error(text=self.engine.error_text, code="RuntimeError").event())
            return False
        if mode == "eof":
            return False
        if mode == "slow_first" and await self._stall():
            return False
        audio = tone(speech_seconds(request.text))
        await self.write_event(AudioStart(rate=RATE, width=2, channels=1).event())
        step = SAMPLES_PER_CHUNK * 2
        chunks = [audio[i:i + step] for i in range(0, len(audio), step)]
        for n, chunk in enumerate(chunks):
            if mode in ("error_midstream", "eof_midstream") and n == len(chunks) // 2:
                if mode == "error_midstream":
                    await self.write_event(Error(text="Piper crashed: out of memory", code="RuntimeError").event())
                return False
            if self.writer.is_closing() or self.reader.at_eof():
                self.session.client_left = True
                return False
            await self.write_event(AudioChunk(rate=RATE, width=2, channels=1, audio=chunk).event())
            self.session.last_audio_at = time.monotonic()
            self.session.first_audio_at = self.session.first_audio_at or self.session.last_audio_at
            if self.engine.chunk_delay:
                await asyncio.sleep(self.engine.chunk_delay)
        await self.write_event(AudioStop().event())
        return True  # wyoming-piper keeps the connection open

    async def _transcript(self, mode: str) -> bool:
        if mode == "asr_error":
            await self.write_event(Error(text="CUDA out of memory", code="RuntimeError").event())
        elif mode == "asr_slow" and await self._stall():
            return False
        if mode in ("asr_error", "asr_eof"):
            return False
        if self.engine.canned is not None:
            await self.write_event(Event(type=self.engine.canned["type"], data=self.engine.canned["data"]))
            return False
        text = self.engine.transcript_text if self.session.pcm else ""
        language = self.engine.transcript_language
        streaming = mode.startswith("asr_streaming")
        if streaming and not await self._stream(len(text.split())):  # protocol 1.7+: start, chunks first
            return False
        await self.write_event(Transcript(text=text, language=language).event())
        if streaming:  # `transcript` (for old clients), then stop
            await self.write_event(TranscriptStop().event())
        return False  # wyoming-faster-whisper: one transcript per connection

    async def _stream(self, upto: int) -> bool:
        """transcript-chunks for the words up to `upto` (transcript-start before the first); False when the
        stream ends here (a failure mode, or the client left)."""
        mode, words = self.engine.mode, self.engine.transcript_text.split()
        if self.said == 0:
            await self.write_event(TranscriptStart(language=self.engine.transcript_language).event())
        while self.said < min(upto, len(words)):
            if mode in _FAILING and self.said == self.engine.fail_after:
                if mode == "asr_streaming_error":
                    await self.write_event(Error(text="CUDA out of memory", code="RuntimeError").event())
                elif mode == "asr_streaming_bad":
                    await self.write_event(Event(type="transcript-chunk", data={"text": 42}))
                    return True
                elif mode == "asr_streaming_silent":
                    await self._stall()
                while mode == "asr_streaming_chatter" and not (self.reader.at_eof() or self.writer.is_closing()):
                    await self.write_event(TranscriptChunk(text=" ").event())
                    await asyncio.sleep(0.02)
                return False
            if self.reader.at_eof() or self.writer.is_closing():
                self.session.client_left = True
                return False
            if self.said and self.engine.chunk_delay:
                await asyncio.sleep(self.engine.chunk_delay)
            await self.write_event(TranscriptChunk(text=words[self.said] + " ").event())
            self.said += 1
        return True

    async def _stall(self) -> bool:
        """Say nothing for `delay` seconds; True (and stop) as soon as the client hangs up instead."""
        deadline = time.monotonic() + self.engine.delay
        while time.monotonic() < deadline:
            if self.reader.at_eof() or self.writer.is_closing():
                self.session.client_left = True
                return True
            await asyncio.sleep(0.01)
        return False

    async def disconnect(self) -> None:
        self.engine.active -= 1
        self.session.ended_at = time.monotonic()


class FakeWyomingEngine:
    def __init__(self, programs: tuple[str, ...] = ("tts", "asr")) -> None:
        self.programs = programs
        self.mode = "ok"
        self.chunk_delay = 0.0
        """Seconds between synthesized audio chunks, and between streamed transcript chunks."""
        self.fail_after = 1
        """Transcript chunks the failing asr_streaming_* modes send before they fail."""
        self.delay = 5.0
        self.transcript_text = TRANSCRIPT
        self.transcript_language: str | None = None
        self.canned: dict[str, Any] | None = None
        """A recorded `transcript` event ({"type", "data"}: tests/fixtures/wyoming/) sent instead of one made up."""
        self.error_text = "Piper failed: voice model is corrupt"
        """What the `error` mode says (a test may make it echo secrets)."""
        self.sessions: list[Session] = []
        self.active = 0
        self.port = 0
        self._server: AsyncTcpServer | None = None

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def requests(self, event_type: str) -> list[Session]:
        """The sessions in which the client sent `event_type` (e.g. synthesize, transcribe, describe)."""
        return [s for s in self.sessions if event_type in s.types]

    def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> AsyncEventHandler:
        """The handler factory for a wyoming server (tcp here; tests may serve it on a unix socket too)."""
        return _Handler(self, reader, writer)

    async def start(self) -> None:
        assert self.mode in MODES, self.mode
        self._server = AsyncTcpServer("127.0.0.1", 0)
        await self._server.start(self.handler)
        assert self._server._server is not None
        self.port = self._server._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()
            if self._server._server is not None:
                await self._server._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
