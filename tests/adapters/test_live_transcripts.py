"""Live transcripts (`transcribe_live`, base.LiveTranscriber): each streaming adapter against its double on a real
port, called directly as the realtime session calls it, with an item's audio (a 24 kHz PCM16 WAV) as the upload.

Wyoming: tests/fakes/wyoming_engine.py's asr_streaming* modes (transcript-start / -chunk / transcript / -stop);
Deepgram: tests/fakes/deepgram_engine.py's `/v1/listen` WebSocket (a final Results per second of audio, the rest
on Finalize, Metadata on CloseStream) and its live_* failure modes.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import struct
import time
import wave
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import aiohttp
import pytest

from gateway.adapters.base import TranscriptionJob
from gateway.adapters.deepgram import DeepgramAdapter
from gateway.adapters.live import Pieces
from gateway.adapters.wyoming import WyomingAdapter
from gateway.audio.workers import AudioWorkers
from gateway.config import Backend, Timeouts
from gateway.errors import GatewayError, RateLimitError, UpstreamError, UpstreamTimeoutError
from gateway.spool import Upload
from tests.conftest import DEMO_KEY, ENGINE_KEY
from tests.fakes.deepgram_engine import LIVE_SECOND, FakeDeepgram
from tests.fakes.wyoming_engine import TRANSCRIPT, FakeWyomingEngine
from tests.support import free_port

NO_HTTP = cast(aiohttp.ClientSession, None)  # the Wyoming adapter never uses HTTP
DG_TEXT = "Hello there. The quick brown fox jumps over the lazy dog."
Jobs = Callable[..., TranscriptionJob]
"""`uploads(seconds, model=, language=)`: a job for an item of that many seconds."""


def item_wav(seconds: float, rate: int = 24_000) -> bytes:
    """An item as the realtime session uploads it: PCM16 mono WAV, here a 300 Hz tone."""
    n = int(seconds * rate)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(struct.pack(f"<{n}h", *(int(8000 * math.sin(2 * math.pi * 300 * i / rate)) for i in range(n))))
    return buffer.getvalue()


@pytest.fixture
async def uploads() -> AsyncIterator[Jobs]:
    pool, made = AudioWorkers(1, 0), []

    def job(seconds: float, model: str = "nova-3", language: str | None = None) -> TranscriptionJob:
        upload = Upload.of("item_1.wav", "audio/wav", item_wav(seconds), pool)
        made.append(upload)
        return TranscriptionJob(request_id="req_1", task="transcribe", public_model="gpt-4o-transcribe",
                                model=model, upload=upload, language=language)

    yield job
    for upload in made:
        upload.close()
    await pool.aclose()


async def collect(pieces: AsyncIterator[str]) -> list[str]:
    return [piece async for piece in pieces]


async def until(predicate: Callable[[], bool], within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def client_tasks() -> set[asyncio.Task[Any]]:
    """The loop's tasks but the doubles' own (aiohttp's server handlers), which end on their own schedule."""
    return {t for t in asyncio.all_tasks() if "RequestHandler" not in repr(t)}


async def partial(pieces: AsyncIterator[str]) -> tuple[list[str], GatewayError]:
    """The pieces before the iterator raised, and what it raised."""
    got: list[str] = []
    with pytest.raises(GatewayError) as failed:
        async for piece in pieces:
            got.append(piece)
    return got, failed.value


def test_pieces_keep_the_engines_spaces_and_add_up_to_the_collapsed_text() -> None:
    backend = Backend("w", "wyoming")
    raw = ["Hel", "lo", " world", "  ", "", "again ", "\tand\nagain"]
    pieces = Pieces(backend, spans=False)
    got = [p for p in (pieces.piece(r) for r in raw) if p]
    assert got == ["Hel", "lo", " world", " again", " and again"]
    assert "".join(got) == " ".join("".join(raw).split())
    assert pieces.rest("Hello world again and again, friend. ") == ", friend."  # the final adds its tail
    assert pieces.rest("Something else entirely") == ""  # never rewrites what was said
    spans = Pieces(backend, spans=True)  # Deepgram: each text a span of words of its own
    assert [spans.piece(t) for t in ["Hello", "", "there."]] == ["Hello", "", " there."]
    with pytest.raises(UpstreamError) as bad:
        spans.piece(42)
    assert bad.value.reason == "bad_response"


# -- Wyoming ----------------------------------------------------------------------------------------------------

def wyoming(url: str, read: float = 2.0) -> WyomingAdapter:
    return WyomingAdapter(Backend("whisper", "wyoming", url=url, timeouts=Timeouts(connect=1.0, read=read)), NO_HTTP)


async def test_wyoming_chunks_are_the_pieces_and_add_up_to_the_transcript(uploads: Jobs) -> None:
    async with FakeWyomingEngine(programs=("asr",)) as engine:
        engine.mode = "asr_streaming"
        adapter = wyoming(engine.url)
        assert not adapter.capabilities.live_transcript  # not known before an `info`
        assert await adapter.ready() and adapter.capabilities.live_transcript  # learnt at the probe
        pieces = await collect(adapter.transcribe_live(uploads(2.0, "base-int8", "en")))
        assert pieces == ["Turn", " on", " the", " living", " room", " lamp."]
        assert "".join(pieces) == TRANSCRIPT
        session = engine.requests("transcribe")[-1]
        assert session.types[:2] == ["transcribe", "audio-start"] and session.types[-1] == "audio-stop"
        assert session.first("transcribe") == {"name": "base-int8", "language": "en"}
        assert len(session.pcm) == 2 * 32_000  # the whole item, as 16 kHz s16le
        await until(lambda: session.ended)
        assert not adapter._connections


async def test_wyoming_chunks_said_while_the_audio_is_sent_come_before_its_end(uploads: Jobs) -> None:
    async with FakeWyomingEngine(programs=("asr",)) as engine:
        engine.mode = "asr_streaming_live"  # a word per second of audio, as it arrives
        adapter = wyoming(engine.url)
        heard_at: list[int] = []
        pieces = []
        async for piece in adapter.transcribe_live(uploads(4.0)):
            pieces.append(piece)
            heard_at.append(len(engine.sessions[-1].pcm))
        assert "".join(pieces) == TRANSCRIPT and len(pieces) == 6
        assert heard_at[0] < 4 * 32_000, heard_at  # the first word reached us before the engine had the whole item


async def test_wyoming_server_that_does_not_stream_gives_its_transcript_once(uploads: Jobs) -> None:
    async with FakeWyomingEngine(programs=("asr",)) as engine:
        adapter = wyoming(engine.url)
        assert await adapter.ready() and not adapter.capabilities.live_transcript
        engine.transcript_text = "  Turn on\tthe lamp. "
        assert await collect(adapter.transcribe_live(uploads(1.0))) == ["Turn on the lamp."]


@pytest.mark.parametrize(("mode", "after", "reason", "error"), [
    ("asr_streaming_error", 0, "engine", UpstreamError),
    ("asr_streaming_error", 2, "engine", UpstreamError),
    ("asr_streaming_eof", 0, "disconnect", UpstreamError),
    ("asr_streaming_eof", 2, "disconnect", UpstreamError),
    ("asr_streaming_bad", 0, "bad_response", UpstreamError),
    ("asr_streaming_bad", 2, "bad_response", UpstreamError),
    ("asr_streaming_silent", 0, "timeout", UpstreamTimeoutError),
    ("asr_streaming_silent", 2, "timeout", UpstreamTimeoutError),
    ("asr_streaming_chatter", 0, "timeout", UpstreamTimeoutError),  # talks forever: the tail's deadline
    ("asr_streaming_chatter", 2, "timeout", UpstreamTimeoutError),
])
async def test_wyoming_failures_before_and_after_the_first_piece(uploads: Jobs, mode: str, after: int, reason: str,
                                                                  error: type[GatewayError]) -> None:
    async with FakeWyomingEngine(programs=("asr",)) as engine:
        engine.mode, engine.fail_after, engine.delay = mode, after, 3.0
        adapter = wyoming(engine.url, read=0.4)
        started = time.monotonic()
        got, failed = await partial(adapter.transcribe_live(uploads(1.0)))
        assert got == ["Turn", " on"][:after]
        assert isinstance(failed, error) and failed.reason == reason, failed
        assert time.monotonic() - started < 2.0
        await until(lambda: engine.sessions[-1].ended)
        assert not adapter._connections


async def test_wyoming_unreachable_is_a_connect_error(uploads: Jobs) -> None:
    got, failed = await partial(wyoming(f"tcp://127.0.0.1:{free_port()}").transcribe_live(uploads(1.0)))
    assert got == [] and isinstance(failed, UpstreamError) and failed.reason == "connect"


async def test_wyoming_aclose_mid_stream_closes_the_connection(uploads: Jobs) -> None:
    async with FakeWyomingEngine(programs=("asr",)) as engine:
        engine.mode, engine.chunk_delay = "asr_streaming", 0.3
        adapter = wyoming(engine.url)
        tasks = client_tasks()
        pieces = adapter.transcribe_live(uploads(1.0))
        assert await anext(pieces) == "Turn"
        await pieces.aclose()
        assert not adapter._connections
        session = engine.sessions[-1]
        await until(lambda: session.ended, 1.0)  # the double saw the hang-up, not the end of its stream
        assert session.client_left and "transcript" not in [e.type for e in session.events]
        assert client_tasks() <= tasks


# -- Deepgram ---------------------------------------------------------------------------------------------------

@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        yield session


def deepgram(url: str, http: aiohttp.ClientSession, read: float = 2.0, key: str = ENGINE_KEY) -> DeepgramAdapter:
    return DeepgramAdapter(Backend("dg", "deepgram", url=url, api_key=key,
                                   timeouts=Timeouts(connect=1.0, read=read)), http)


async def test_deepgram_finals_are_the_pieces_with_the_engines_credential(uploads: Jobs,
                                                                        http: aiohttp.ClientSession) -> None:
    async with FakeDeepgram(expected_api_key=ENGINE_KEY) as engine:
        engine.transcript_text = DG_TEXT
        adapter = deepgram(engine.url, http)
        assert adapter.capabilities.live_transcript
        pieces = await collect(adapter.transcribe_live(uploads(3.0, "nova-3", "pt-br")))
        # a word per second of audio (three), the rest on Finalize
        assert pieces == ["Hello", " there.", " The", " quick brown fox jumps over the lazy dog."]
        assert "".join(pieces) == DG_TEXT
        live = engine.live[-1]
        assert live.query == {"model": "nova-3", "language": "pt-BR", "encoding": "linear16", "sample_rate": "16000",
                              "channels": "1", "punctuate": "true", "interim_results": "false"}
        assert live.headers["Authorization"] == f"Token {ENGINE_KEY}"
        assert not any(DEMO_KEY in v or "Bearer" in v for v in live.headers.values())
        assert len(live.audio) == 3 * LIVE_SECOND
        assert [json.loads(t)["type"] for t in live.texts] == ["Finalize", "CloseStream"]
        assert live.finished
        await until(lambda: live.ended)


async def test_deepgram_interim_results_are_never_pieces(uploads: Jobs, http: aiohttp.ClientSession) -> None:
    async with FakeDeepgram(expected_api_key=ENGINE_KEY) as engine:
        engine.transcript_text, engine.interims = DG_TEXT, True
        pieces = await collect(deepgram(engine.url, http).transcribe_live(uploads(2.0)))
        assert "".join(pieces) == DG_TEXT and len(pieces) == 3
        assert sum(not f["is_final"] for f in engine.live[-1].sent if f["type"] == "Results") == 3


@pytest.mark.parametrize(("mode", "key", "reason", "error"), [
    ("ok", "not-the-key", "backend_auth", UpstreamError),
    ("401", ENGINE_KEY, "backend_auth", UpstreamError),
    ("403", ENGINE_KEY, "backend_auth", UpstreamError),
    ("429", ENGINE_KEY, "backend_rate_limit", RateLimitError),
    ("500", ENGINE_KEY, "backend_5xx", UpstreamError),
    ("hang", ENGINE_KEY, "timeout", UpstreamTimeoutError),
])
async def test_deepgram_refused_upgrade_is_the_usual_error(uploads: Jobs, http: aiohttp.ClientSession, mode: str,
                                                           key: str, reason: str, error: type[GatewayError]) -> None:
    async with FakeDeepgram(expected_api_key=ENGINE_KEY) as engine:
        engine.mode = mode
        adapter = deepgram(engine.url, http, read=0.3, key=key)
        got, failed = await partial(adapter.transcribe_live(uploads(1.0)))
        assert got == [] and isinstance(failed, error) and failed.reason == reason, failed
        assert ENGINE_KEY not in failed.message and "not-the-key" not in failed.message
        assert not engine.live  # never upgraded


async def test_deepgram_unreachable_is_a_connect_error(uploads: Jobs, http: aiohttp.ClientSession) -> None:
    got, failed = await partial(deepgram(f"http://127.0.0.1:{free_port()}", http).transcribe_live(uploads(1.0)))
    assert got == [] and isinstance(failed, UpstreamError) and failed.reason == "connect"


@pytest.mark.parametrize("after", [0, 1], ids=["before", "after"])
@pytest.mark.parametrize(("mode", "reason", "error"), [
    ("live_close_error", "engine", UpstreamError),
    ("live_error_message", "engine", UpstreamError),
    ("live_drop", "disconnect", UpstreamError),
    ("live_not_json", "bad_response", UpstreamError),
    ("live_bad_transcript", "bad_response", UpstreamError),
    ("live_huge", "bad_response", UpstreamError),
])
async def test_deepgram_failures_before_and_after_the_first_piece(uploads: Jobs, http: aiohttp.ClientSession, mode: str,
                                                                  reason: str, error: type[GatewayError],
                                                                  after: int) -> None:
    async with FakeDeepgram(expected_api_key=ENGINE_KEY) as engine:
        engine.mode, engine.fail_after, engine.transcript_text = mode, after, DG_TEXT
        tasks = client_tasks()
        got, failed = await partial(deepgram(engine.url, http).transcribe_live(uploads(3.0)))
        assert got == ["Hello"][:after]
        assert isinstance(failed, error) and failed.reason == reason, failed
        assert ENGINE_KEY not in failed.message
        if mode == "live_close_error":
            assert "NET-0000" in failed.message
        await until(lambda: engine.live[-1].ended)
        assert client_tasks() <= tasks


@pytest.mark.parametrize("mode", ["live_silent", "live_chatter"])
async def test_deepgram_stream_that_never_ends_times_out(uploads: Jobs, http: aiohttp.ClientSession,
                                                         mode: str) -> None:
    async with FakeDeepgram(expected_api_key=ENGINE_KEY) as engine:
        engine.mode, engine.transcript_text = mode, DG_TEXT
        started = time.monotonic()
        got, failed = await partial(deepgram(engine.url, http, read=0.5).transcribe_live(uploads(1.0)))
        assert "".join(got) == DG_TEXT  # everything said before it stopped ending
        assert isinstance(failed, UpstreamTimeoutError) and failed.reason == "timeout"
        assert time.monotonic() - started < 2.5
        await until(lambda: engine.live[-1].ended)


async def test_deepgram_aclose_mid_stream_closes_the_socket(uploads: Jobs, http: aiohttp.ClientSession) -> None:
    async with FakeDeepgram(expected_api_key=ENGINE_KEY) as engine:
        engine.transcript_text, engine.chunk_delay = DG_TEXT, 0.2
        tasks = client_tasks()
        pieces = deepgram(engine.url, http).transcribe_live(uploads(5.0))
        assert await anext(pieces) == "Hello"
        started = time.monotonic()
        await pieces.aclose()
        live = engine.live[-1]
        await until(lambda: live.ended, 1.0)  # the double saw the client leave
        assert not live.finished and sum(f["type"] == "Results" for f in live.sent) < 6
        assert time.monotonic() - started < 1.0
        assert client_tasks() <= tasks  # also pins aiohttp's `ClientWebSocketResponse._response` (deepgram_live)
