"""The Wyoming adapter through the gateway with the official SDK, against doubles built from the `wyoming`
package's own server classes: a Piper-like TTS server and a faster-whisper-like ASR server (see
tests/fakes/wyoming_engine.py and native-engines.md section 1). Figures are printed (`pytest -s`)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import struct
import textwrap
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import av
import httpx2
import openai
import pytest
import srt
import webvtt
from openai.types.audio import TranscriptionVerbose
from wyoming.audio import AudioChunk
from wyoming.client import AsyncTcpClient
from wyoming.server import AsyncUnixServer
from wyoming.tts import Synthesize, SynthesizeVoice

from gateway.adapters.base import SpeechJob
from gateway.adapters.wyoming import WyomingAdapter
from gateway.audio.decode import decode_chunks
from gateway.config import Backend, NativeVoice
from gateway.errors import UpstreamError
from tests.adapters.common import serve, speech_until_cut
from tests.conftest import DEMO_KEY, Gateway, ServerThread, sdk, sha
from tests.fakes.wyoming_engine import (
    ASR_MODEL,
    MULTI_VOICE,
    SINGLE_VOICE,
    TRANSCRIPT,
    FakeWyomingEngine,
    speech_seconds,
)
from tests.support import expect_error, free_port, probe_backends, wait_for

TEXT = "Hello from the gateway, spoken by Piper."
SECONDS = speech_seconds(TEXT)
HTTP = cast(aiohttp.ClientSession, None)  # the Wyoming adapter never uses HTTP


def wyoming_config(spool_dir: Path, piper_url: str, whisper_url: str, *, tts_routes: str = "piper",
                   asr_routes: str = "whisper", piper_extra: str = "") -> str:
    def routes(names: str, model: str) -> str:
        return ", ".join(f"{{backend: {n}, model: {model}}}" for n in names.split(","))

    return textwrap.dedent(f"""
        server:
          max_upload_bytes: 2000000
          spool_memory_bytes: 65536
          spool_dir: {spool_dir}
        keys:
          - {{name: demo, tenant: acme, sha256: "{sha(DEMO_KEY)}"}}
        backends:
          piper: {{kind: wyoming, url: "{piper_url}", timeout_s: 1, connect_timeout_s: 1{piper_extra}}}
          whisper: {{kind: wyoming, url: "{whisper_url}", timeout_s: 1, connect_timeout_s: 1}}
        models:
          tts-1: {{task: speech, routes: [{routes(tts_routes, "piper")}]}}
          whisper-1: {{task: transcription, routes: [{routes(asr_routes, ASR_MODEL)}]}}
        voices:
          nova: {{piper: {{name: {MULTI_VOICE}, speaker: p456}}}}
          alloy: {{piper: {SINGLE_VOICE}}}
    """)


@pytest.fixture
def piper(servers: ServerThread) -> Iterator[FakeWyomingEngine]:
    yield from serve(servers, FakeWyomingEngine(("tts",)))


@pytest.fixture
def whisper(servers: ServerThread) -> Iterator[FakeWyomingEngine]:
    yield from serve(servers, FakeWyomingEngine(("asr",)))


@pytest.fixture
def gateway(make_gateway: Callable[[str], Gateway], tmp_path: Path, piper: FakeWyomingEngine,
            whisper: FakeWyomingEngine) -> Gateway:
    return make_gateway(wyoming_config(tmp_path / "spool", piper.url, whisper.url))


def closed(*engines: FakeWyomingEngine) -> None:
    """Every connection the gateway opened has been closed."""
    wait_for(lambda: all(e.active == 0 and all(s.ended for s in e.sessions) for e in engines),
             what="the gateway to close its Wyoming connections")


def probe(data: bytes) -> tuple[str, str, float]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        rate = stream.codec_context.sample_rate
        return container.format.name.split(",")[0], stream.codec_context.name, samples / rate


def stereo_wav(seconds: float = 1.5, rate: int = 44_100) -> bytes:
    """A 44.1 kHz stereo tone, so the gateway really converts it to 16 kHz mono."""
    n = int(seconds * rate)
    frames = struct.pack(f"<{2 * n}h", *(v for i in range(n) for v in
                                         (int(8000 * math.sin(2 * math.pi * 300 * i / rate)),) * 2))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames)
    return buf.getvalue()


UPLOAD = stereo_wav()
UPLOAD_SECONDS = 1.5


def speak(c: openai.OpenAI, **kw: Any) -> bytes:
    return c.audio.speech.create(**{"model": "tts-1", "voice": "nova", "input": TEXT, "response_format": "pcm",
                                    **kw}).content


def transcribe(c: openai.OpenAI, **kw: Any) -> Any:
    return c.audio.transcriptions.create(**{"model": "whisper-1", "file": ("a.wav", UPLOAD, "audio/wav"), **kw})


# -- speech ----------------------------------------------------------------------------------------------------


EXPECTED = {"mp3": ("mp3", "mp3"), "opus": ("ogg", "opus"), "aac": ("aac", "aac"), "flac": ("flac", "flac"),
            "wav": ("wav", "pcm_s16le")}


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_every_speech_format_from_piper_pcm(client: openai.OpenAI, piper: FakeWyomingEngine, fmt: str) -> None:
    data = speak(client, response_format=fmt)
    if fmt == "pcm":
        seconds = len(data) / 48_000  # OpenAI pcm: s16le mono at 24 kHz, resampled from Piper's 22050 Hz
    else:
        container, codec, seconds = probe(data)
        assert (container, codec.removesuffix("float")) == EXPECTED[fmt]
    assert seconds == pytest.approx(SECONDS, rel=0.1)
    [session] = piper.requests("synthesize")
    assert session.types == ["synthesize"]  # exactly the documented request, on a connection of its own
    assert session.events[0].data == {"text": TEXT, "voice": {"name": MULTI_VOICE, "speaker": "p456"}}
    assert [s.types for s in piper.requests("describe")] == [["describe"]]  # once, to learn it has a tts program
    closed(piper)


def test_voice_table_gives_name_and_speaker(client: openai.OpenAI, piper: FakeWyomingEngine) -> None:
    speak(client, voice="alloy")
    speak(client, voice="nova")
    voices = [s.first("synthesize")["voice"] for s in piper.requests("synthesize")]  # type: ignore[index]
    assert voices == [{"name": SINGLE_VOICE}, {"name": MULTI_VOICE, "speaker": "p456"}]
    with pytest.raises(openai.BadRequestError) as info:  # not in the table: sent as it is; Piper has no such voice
        speak(client, voice="echo")
    expect_error(info.value, 400, "invalid_request_error", "invalid_value", "voice",
                 message="Backend 'piper' does not have the requested voice.")
    assert info.value.response.headers["x-should-retry"] == "false"
    assert DEMO_KEY not in json.dumps([e.data for s in piper.sessions for e in s.events])
    closed(piper)


@pytest.mark.parametrize("speed", [2.0, 0.5])
def test_speed_is_time_stretched_by_the_gateway(client: openai.OpenAI, piper: FakeWyomingEngine,
                                                speed: float) -> None:
    seconds = probe(speak(client, response_format="wav", speed=speed))[2]
    assert seconds == pytest.approx(SECONDS / speed, rel=0.1)
    assert set(piper.requests("synthesize")[0].first("synthesize") or {}) == {"text", "voice"}  # no speed field


async def _direct_first_chunk(url: str) -> float:
    """Seconds from connecting to the first audio-chunk, talking Wyoming straight to the double."""
    host, port = url.removeprefix("tcp://").split(":")
    started = time.perf_counter()
    async with AsyncTcpClient(host, int(port)) as c:
        await c.write_event(Synthesize(TEXT, voice=SynthesizeVoice(name=SINGLE_VOICE)).event())
        while (event := await c.read_event()) is not None and not AudioChunk.is_type(event.type):
            pass
        return time.perf_counter() - started


@pytest.mark.parametrize("fmt", ["pcm", "mp3"])
def test_audio_reaches_the_client_while_piper_still_speaks(servers: ServerThread, client: openai.OpenAI,
                                                           piper: FakeWyomingEngine, fmt: str) -> None:
    piper.chunk_delay = 0.02  # ~52 chunks: about a second of sending
    direct = servers.run(_direct_first_chunk(piper.url))
    started = time.monotonic()
    first_at = None
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input=TEXT,
                                                            response_format=fmt) as response:
        for _ in response.iter_bytes(512):
            first_at = first_at or time.monotonic()
    total = time.monotonic() - started
    session = piper.requests("synthesize")[-1]
    assert first_at is not None and session.last_audio_at is not None and session.first_audio_at is not None
    assert first_at < session.last_audio_at - 0.5  # the client had audio long before Piper finished
    print(f"\n{fmt}: first byte {(first_at - started) * 1000:.0f} ms after the request, "
          f"{(first_at - session.first_audio_at) * 1000:.0f} ms after the engine's first chunk (direct Wyoming "
          f"client: first chunk {direct * 1000:.1f} ms after connecting); whole response {total * 1000:.0f} ms")


def test_client_leaving_mid_stream_closes_the_engine_connection(client: openai.OpenAI,
                                                                 piper: FakeWyomingEngine) -> None:
    piper.chunk_delay = 0.05
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input=TEXT,
                                                            response_format="pcm") as response:
        next(response.iter_bytes(1024))
    closed(piper)
    session = piper.requests("synthesize")[0]
    assert session.client_left and "audio-stop" not in session.types


# -- transcription --------------------------------------------------------------------------------------------


def test_the_upload_is_sent_as_16k_mono_pcm(client: openai.OpenAI, whisper: FakeWyomingEngine) -> None:
    result = transcribe(client, language="de")
    assert result.text == TRANSCRIPT
    [session] = whisper.requests("transcribe")
    types = session.types
    assert types[:2] == ["transcribe", "audio-start"] and types[-1] == "audio-stop"
    assert set(types[2:-1]) == {"audio-chunk"}
    assert session.first("transcribe") == {"name": ASR_MODEL, "language": "de"}
    start = session.first("audio-start") or {}
    assert (start["rate"], start["width"], start["channels"]) == (16_000, 2, 1)
    expected = b"".join(decode_chunks(io.BytesIO(UPLOAD), sample_rate=16_000, max_seconds=60))
    assert bytes(session.pcm) == expected  # exactly the decoded upload, converted once
    assert len(expected) == pytest.approx(UPLOAD_SECONDS * 32_000, abs=64)
    closed(whisper)


@pytest.mark.parametrize("fmt", ["json", "text", "srt", "vtt", "verbose_json"])
def test_every_transcript_format(client: openai.OpenAI, whisper: FakeWyomingEngine, fmt: str) -> None:
    whisper.transcript_language = "en"
    result = transcribe(client, response_format=fmt)  # words: tests/test_honest_timings.py
    if fmt == "json":
        assert result.text == TRANSCRIPT
    elif fmt == "text":
        assert result.strip() == TRANSCRIPT
    elif fmt == "srt":
        [cue] = srt.parse(result)
        assert cue.content == TRANSCRIPT and cue.start.total_seconds() == 0
        assert cue.end.total_seconds() == pytest.approx(UPLOAD_SECONDS, abs=0.01)
    elif fmt == "vtt":
        [caption] = webvtt.from_buffer(io.StringIO(result)).captions
        assert caption.text == TRANSCRIPT
        assert (caption.start, caption.end) == ("00:00:00.000", "00:00:01.500")  # end_in_seconds is whole seconds
    else:
        verbose = TranscriptionVerbose.model_validate(result.model_dump())
        assert verbose.language == "english" and verbose.text == TRANSCRIPT
        assert verbose.duration == pytest.approx(UPLOAD_SECONDS, abs=0.01)
        [segment] = verbose.segments or []  # text only: one segment spanning the clip, and no words
        assert (segment.start, segment.end) == (0.0, pytest.approx(UPLOAD_SECONDS, abs=0.01))
        assert verbose.words is None


def test_streaming_transcript_events_are_skipped_for_the_final_one(client: openai.OpenAI,
                                                                    whisper: FakeWyomingEngine) -> None:
    whisper.mode, whisper.transcript_language = "asr_streaming", "de"
    verbose = transcribe(client, response_format="verbose_json")
    assert (verbose.text, verbose.language) == (TRANSCRIPT, "german")  # the engine's language, when it says
    closed(whisper)


def test_empty_transcript(client: openai.OpenAI, whisper: FakeWyomingEngine) -> None:
    whisper.transcript_text = ""
    verbose = transcribe(client, response_format="verbose_json", timestamp_granularities=["segment"])
    assert verbose.text == "" and verbose.segments == []


def test_translation_is_refused_before_any_engine_call(client: openai.OpenAI, whisper: FakeWyomingEngine) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.translations.create(model="whisper-1", file=("a.wav", UPLOAD, "audio/wav"))
    expect_error(info.value, 400, "invalid_request_error", "unsupported_task", "model",
                 message="cannot do translation")
    assert whisper.sessions == []


# -- failures --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["speech", "transcription"])
def test_refused_connection_is_502(make_gateway: Callable[[str], Gateway], tmp_path: Path, task: str) -> None:
    dead = f"tcp://127.0.0.1:{free_port()}"
    gw = make_gateway(wyoming_config(tmp_path / "spool", dead, dead))
    with sdk(gw.base_url) as c:
        with pytest.raises(openai.InternalServerError) as info:
            speak(c) if task == "speech" else transcribe(c)
    name = "piper" if task == "speech" else "whisper"
    error = expect_error(info.value, 502, "upstream_error", "bad_gateway")
    assert error["message"] == f"Backend '{name}' is unreachable."


@pytest.mark.parametrize(("mode", "status", "message"), [
    ("error", 502, "Backend 'piper' reported an error: Piper failed: voice model is corrupt"),
    ("eof", 502, "Backend 'piper' closed the connection unexpectedly."),
    ("slow_first", 504, "Backend 'piper' did not answer in time."),
])
def test_speech_failing_before_audio_is_a_clean_error(client: openai.OpenAI, piper: FakeWyomingEngine, mode: str,
                                                      status: int, message: str) -> None:
    piper.mode = mode
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        speak(client)
    code = "upstream_timeout" if status == 504 else "bad_gateway"
    expect_error(info.value, status, "upstream_error", code, message=message)
    if mode == "slow_first":
        assert time.monotonic() - started >= 0.9  # it waited out timeout_s (1 s per event), then gave up
    closed(piper)


def test_engine_error_text_is_redacted_for_client_and_log(client: openai.OpenAI, piper: FakeWyomingEngine,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway")
    piper.mode = "error"
    piper.error_text = (f"cannot reach {piper.url}/models (127.0.0.1:{piper.port}) with Authorization: "
                        "Bearer hf_abcdefghijklmnop1234 or sk-live-0123456789abc\x00\x1b[2J")
    with pytest.raises(openai.InternalServerError) as info:
        speak(client)
    error = expect_error(info.value, 502, "upstream_error", "bad_gateway", message="cannot reach [redacted]")
    for secret in (f":{piper.port}", "hf_abcdefghijklmnop1234", "sk-live", "\x00", "\x1b"):
        assert secret not in error["message"] and secret not in caplog.text, secret
    closed(piper)


@pytest.mark.parametrize("mode", ["error_midstream", "eof_midstream"])
def test_speech_failing_mid_stream_cuts_the_body(client: openai.OpenAI, piper: FakeWyomingEngine, mode: str) -> None:
    piper.mode = mode
    received = speech_until_cut(client, TEXT)
    assert 0 < len(received) < SECONDS * 48_000 * 0.75  # about half arrived, then the cut
    closed(piper)


def test_speech_error_mid_sse_stream_is_an_error_event(client: openai.OpenAI, piper: FakeWyomingEngine) -> None:
    piper.mode = "error_midstream"
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice="nova", input=TEXT,
                                                            response_format="pcm", stream_format="sse") as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert events[0]["type"] == "speech.audio.delta"
    error = events[-1]["error"]
    assert error["type"] == "upstream_error" and "Piper crashed: out of memory" in error["message"]
    closed(piper)


@pytest.mark.parametrize(("mode", "status", "message"), [
    ("asr_error", 502, "Backend 'whisper' reported an error: CUDA out of memory"),
    ("asr_error_early", 502, "Backend 'whisper' reported an error: Model 'nope' is not installed"),
    ("asr_eof", 502, "Backend 'whisper' closed the connection unexpectedly."),
    ("asr_slow", 504, "Backend 'whisper' did not answer in time."),
])
def test_transcription_failures(client: openai.OpenAI, whisper: FakeWyomingEngine, mode: str, status: int,
                                message: str) -> None:
    whisper.mode = mode
    with pytest.raises(openai.APIStatusError) as info:
        transcribe(client, response_format="text")
    expect_error(info.value, status, "upstream_error", "upstream_timeout" if status == 504 else "bad_gateway",
                 message=message)
    closed(whisper)


# -- describe: readiness and which server does what -----------------------------------------------------------


def test_readiness_is_describe_and_never_synthesizes(servers: ServerThread, gateway: Gateway,
                                                     piper: FakeWyomingEngine, whisper: FakeWyomingEngine) -> None:
    probe_backends(servers, gateway)
    ready = httpx2.get(f"{gateway.url}/readyz")
    assert ready.status_code == 200 and ready.json()["backends"] == {"piper": "up", "whisper": "up"}
    assert [s.types for s in piper.sessions + whisper.sessions] == [["describe"], ["describe"]]
    servers.run(whisper.stop())
    probe_backends(servers, gateway)
    down = httpx2.get(f"{gateway.url}/readyz")
    assert down.status_code == 200 and down.json()["unroutable_models"] == ["whisper-1"]
    closed(piper)


def test_a_server_without_tts_fails_over_without_being_asked_to_speak(
        make_gateway: Callable[[str], Gateway], tmp_path: Path, piper: FakeWyomingEngine,
        whisper: FakeWyomingEngine) -> None:
    gw = make_gateway(wyoming_config(tmp_path / "spool", piper.url, whisper.url, tts_routes="whisper,piper"))
    with sdk(gw.base_url) as c:
        assert len(speak(c)) > 10_000
    assert [s.types for s in whisper.sessions] == [["describe"]]  # asked what it offers, never sent `synthesize`
    gw = make_gateway(wyoming_config(tmp_path / "spool", piper.url, whisper.url, tts_routes="whisper"))
    with sdk(gw.base_url) as c:
        with pytest.raises(openai.InternalServerError) as info:
            speak(c)
    expect_error(info.value, 502, "upstream_error", "bad_gateway",
                 message="Backend 'whisper' offers no text-to-speech program.")
    assert info.value.response.headers["x-should-retry"] == "false"


def test_tasks_setting_keeps_other_tasks_off_a_backend(make_gateway: Callable[[str], Gateway], tmp_path: Path,
                                                       piper: FakeWyomingEngine) -> None:
    gw = make_gateway(wyoming_config(tmp_path / "spool", piper.url, piper.url, asr_routes="piper",
                                     piper_extra=", tasks: [speech]"))
    with sdk(gw.base_url) as c:
        with pytest.raises(openai.BadRequestError) as info:
            transcribe(c)
        assert len(speak(c)) > 10_000
    expect_error(info.value, 400, "invalid_request_error", "unsupported_task", "model",
                 message="cannot do transcription")
    assert piper.requests("transcribe") == []


@pytest.mark.parametrize(("url", "options", "problem"), [
    ("http://piper:10200", {}, "backends.piper.url: kind 'wyoming' needs tcp://host:port"),
    ("tcp://piper", {}, "backends.piper.url: expected tcp://host:port"),
    ("tcp://piper:10200", {"tasks": ["translation"]}, "backends.piper.tasks: expected a non-empty list"),
    ("tcp://piper:10200", {"voice": "x"}, "backends.piper.voice: unknown option for kind .wyoming."),
])
def test_bad_settings_are_config_errors(url: str, options: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        WyomingAdapter(Backend("piper", "wyoming", url, options=options), HTTP)


async def test_unix_socket_and_shutdown_mid_stream(tmp_path: Path) -> None:
    """unix:// works like tcp://; closing the adapter ends a stream in flight with an error, not silently."""
    engine = FakeWyomingEngine(("tts",))
    engine.chunk_delay = 0.02
    server = AsyncUnixServer(tmp_path / "piper.sock")
    await server.start(engine.handler)
    adapter = WyomingAdapter(Backend("piper", "wyoming", f"unix://{tmp_path}/piper.sock"), HTTP)
    try:
        assert await adapter.ready()
        stream = await adapter.synthesize(SpeechJob("r", "tts-1", "piper", NativeVoice(SINGLE_VOICE), TEXT))
        assert stream.format.sample_rate == 22_050 and not stream.speed_applied
        assert await anext(stream.chunks)
        await adapter.aclose()
        with pytest.raises(UpstreamError, match="shut down"):
            await anext(stream.chunks)
    finally:
        await server.stop()
    await asyncio.sleep(0.05)
    assert engine.active == 0


async def test_both_framings_are_read_inline_data_and_data_block() -> None:
    """native-engines.md 1.1: a header may carry `data` inline, and a data block is merged over it. The
    adapter reads with the package's reader, so a server writing either form is understood."""
    pcm = b"\x01\x00" * 800

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = json.loads(await reader.readline())
        await reader.readexactly(request.get("data_length", 0))
        if request["type"] == "describe":  # data inline in the header, no data block
            writer.write(json.dumps({"type": "info", "data": {"tts": [{"name": "piper"}], "asr": []}}).encode()
                         + b"\n")
        else:  # header data overridden by the data block: the rate is 16000, not 8000
            block = json.dumps({"rate": 16_000}).encode()
            writer.write(json.dumps({"type": "audio-start", "data": {"rate": 8_000, "width": 2, "channels": 1},
                                     "data_length": len(block)}).encode() + b"\n" + block)
            writer.write(json.dumps({"type": "audio-chunk", "data": {"rate": 16_000, "width": 2, "channels": 1},
                                     "payload_length": len(pcm)}).encode() + b"\n" + pcm)
            writer.write(b'{"type": "audio-stop"}\n')
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    adapter = WyomingAdapter(Backend("piper", "wyoming", f"tcp://127.0.0.1:{port}"), HTTP)
    try:
        assert await adapter.ready()
        stream = await adapter.synthesize(SpeechJob("r", "tts-1", "piper", NativeVoice(SINGLE_VOICE), TEXT))
        assert stream.format.sample_rate == 16_000
        assert b"".join([chunk async for chunk in stream.chunks]) == pcm
    finally:
        server.close()
        await server.wait_closed()


async def test_asyncio_internals() -> None:
    """What _Connection reads of asyncio's StreamReader: `_buffer` holds bytes received and not read yet,
    and once the connection is reset, `readline` raises rather than return them."""
    reader = asyncio.StreamReader()
    reader.feed_data(b'{"type": "error"}\n')
    reader.set_exception(ConnectionResetError())
    assert reader._buffer == bytearray(b'{"type": "error"}\n')
    with pytest.raises(ConnectionResetError):
        await reader.readline()
