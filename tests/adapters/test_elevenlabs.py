"""ElevenLabs through the gateway with the official SDK, against a double speaking ElevenLabs' wire format:
the exact native requests, every speech format, native and stretched speed, streaming, Scribe transcripts
in every format, the refused translation, ElevenLabs' own errors (quota, validation, voices) and the shipped
example config.
The contract every HTTP engine keeps (refusals, rate limits, failures, hangs, drops, readiness) is
tests/adapters/test_http_contract.py."""

from __future__ import annotations

import array
import io
import json
import math
import subprocess
import sys
import textwrap
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import openai
import pytest
import srt
import webvtt
from openai.types.audio import TranscriptionVerbose

from gateway.adapters import ADAPTERS, build_adapters
from gateway.adapters.elevenlabs import ElevenLabsAdapter
from gateway.config import Backend, ConfigError, parse_config
from gateway.upstreams import Upstreams
from tests.adapters.common import (
    probe,
    serve,
)
from tests.conftest import DEMO_KEY, ENGINE_KEY, Gateway, ServerThread, sdk, sha
from tests.fakes.elevenlabs_engine import FakeElevenLabs, speech_seconds, synth
from tests.support import expect_error

ROOT = Path(__file__).resolve().parents[2]
TEXT = "The gateway speaks through ElevenLabs, one sentence at a time."  # 62 chars: 3.1 s of audio
VOICE_ID = "21m00Tcm4TlvDq8ikWAM"
SECRETS = (ENGINE_KEY, "Invalid API key", "credits remaining")
CODECS = {"mp3": ("mp3", "mp3"), "opus": ("ogg", "opus"), "aac": ("aac", "aac"), "flac": ("flac", "flac"),
          "wav": ("wav", "pcm_s16le")}


def config(url: str, spool: Path, backend_extra: str = "") -> str:
    return textwrap.dedent(f"""
        server: {{spool_dir: {spool}, max_upload_bytes: 2000000}}
        keys:
          - {{name: demo, tenant: acme, sha256: "{sha(DEMO_KEY)}"}}
        backends:
          eleven:
            kind: elevenlabs
            url: "{url}"
            api_key: "{ENGINE_KEY}"
            timeout_s: 2
            connect_timeout_s: 1
    """) + textwrap.indent(textwrap.dedent(backend_extra), " " * 4) + textwrap.dedent("""
        models:
          tts-1: {task: speech, routes: [{backend: eleven, model: eleven_multilingual_v2}]}
          whisper-1: {task: transcription, routes: [{backend: eleven, model: scribe_v1}]}
        voices:
          nova: {eleven: 21m00Tcm4TlvDq8ikWAM}
          odd: {eleven: "a b/c"}
    """)


@pytest.fixture
def engine(servers: ServerThread) -> Iterator[FakeElevenLabs]:
    yield from serve(servers, FakeElevenLabs(expected_api_key=ENGINE_KEY))


@pytest.fixture
def gateway(make_gateway: Callable[[str], Gateway], engine: FakeElevenLabs, tmp_path: Path) -> Gateway:
    return make_gateway(config(engine.url, tmp_path / "spool"))


def speak(client: openai.OpenAI, fmt: str = "mp3", **kw: object) -> bytes:
    return client.audio.speech.create(model="tts-1", voice="nova", input=TEXT, response_format=fmt,  # type: ignore[arg-type]
                                      **kw).content  # type: ignore[arg-type]


def tone_wav(seconds: float = 4.0, rate: int = 16_000) -> bytes:
    frames = array.array("h", (int(6000 * math.sin(2 * math.pi * 440 * i / rate)) for i in range(int(seconds * rate))))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames.tobytes())
    return buf.getvalue()


WAV = tone_wav()


def transcribe(client: openai.OpenAI, **kw: object) -> object:
    return client.audio.transcriptions.create(model="whisper-1", file=("talk.wav", WAV, "audio/wav"),  # type: ignore[call-overload]
                                              **kw)


# -- speech: the native request ---------------------------------------------------------------------------


def test_speech_sends_the_documented_request_with_the_gateway_key(client: openai.OpenAI,
                                                                  engine: FakeElevenLabs) -> None:
    audio = speak(client, "mp3")
    [rec] = engine.requests
    assert (rec.method, rec.path) == ("POST", f"/v1/text-to-speech/{VOICE_ID}/stream")
    assert rec.query == {"output_format": "mp3_44100_128"}
    assert rec.headers["xi-api-key"] == ENGINE_KEY
    assert "Authorization" not in rec.headers
    assert not any(DEMO_KEY in value for value in rec.headers.values())
    assert rec.headers["Content-Type"] == "application/json"
    assert rec.headers["Accept-Encoding"] == "identity"  # the gateway's session does not decompress
    assert rec.json == {"text": TEXT, "model_id": "eleven_multilingual_v2"}  # speed 1.0: the voice's own settings
    assert audio == engine.sent[-1]  # mp3_44100_128 is relayed untouched


def test_voice_id_is_one_percent_encoded_path_segment(client: openai.OpenAI, engine: FakeElevenLabs) -> None:
    client.audio.speech.create(model="tts-1", voice="odd", input="Hi there.", response_format="pcm")
    assert engine.last.path == "/v1/text-to-speech/a%20b%2Fc/stream"


@pytest.mark.parametrize(("fmt", "native"), [("mp3", "mp3_44100_128"), ("pcm", "pcm_24000"), ("wav", "pcm_24000"),
                                             ("flac", "pcm_24000"), ("aac", "pcm_24000"), ("opus", "pcm_24000")])
def test_each_format_is_that_codec_and_length(client: openai.OpenAI, engine: FakeElevenLabs, fmt: str,
                                              native: str) -> None:
    response = client.audio.speech.with_raw_response.create(model="tts-1", voice="nova", input=TEXT,
                                                             response_format=fmt)  # type: ignore[arg-type]
    data = response.content
    assert engine.last.query["output_format"] == native
    if fmt == "pcm":
        assert response.headers["content-type"] == "audio/pcm"
        assert data == engine.sent[-1]  # ElevenLabs' pcm_24000 is OpenAI's pcm: passed through
        seconds = len(data) / 48_000
    else:
        container, codec, rate, seconds = probe(data)
        assert (container, codec) == CODECS[fmt]
        assert rate == {"mp3": 44_100, "opus": 48_000}.get(fmt, 24_000)
    assert seconds == pytest.approx(speech_seconds(TEXT), rel=0.1)


@pytest.mark.parametrize(("speed", "native"), [(1.2, True), (0.7, True), (1.1, True), (2.0, False), (0.5, False),
                                               (4.0, False)])
def test_speed_native_within_range_stretched_outside(client: openai.OpenAI, engine: FakeElevenLabs, speed: float,
                                                     native: bool) -> None:
    seconds = probe(speak(client, "wav", speed=speed))[3]
    sent = engine.last.json
    if native:
        assert sent["voice_settings"] == {"speed": speed}
    else:
        assert "voice_settings" not in sent  # the double refuses speeds outside 0.7..1.2; the gateway stretches
    assert seconds == pytest.approx(speech_seconds(TEXT) / speed, rel=0.1)


def test_configured_voice_settings_go_with_every_request(make_gateway: Callable[[str], Gateway],
                                                         engine: FakeElevenLabs, tmp_path: Path) -> None:
    gw = make_gateway(config(engine.url, tmp_path / "spool", """
        voice_settings: {stability: 0.4, similarity_boost: 0.8, use_speaker_boost: true}
        optimize_streaming_latency: 2
        enable_logging: false
    """))
    with sdk(gw.base_url) as c:
        speak(c, "mp3")
        speak(c, "mp3", speed=1.15)
        transcribe(c)
    first, second, stt = engine.requests
    settings = {"stability": 0.4, "similarity_boost": 0.8, "use_speaker_boost": True}
    assert first.json["voice_settings"] == settings
    assert second.json["voice_settings"] == {**settings, "speed": 1.15}
    assert first.query == {"output_format": "mp3_44100_128", "optimize_streaming_latency": "2",
                           "enable_logging": "false"}
    assert stt.query == {"optimize_streaming_latency": "2", "enable_logging": "false"}


def first_byte_direct(engine: FakeElevenLabs, output_format: str) -> float:
    """Seconds to the double's first audio byte asked directly (no gateway), on a warm connection."""
    with httpx2.Client(headers={"xi-api-key": ENGINE_KEY}) as http:
        for _ in range(2):
            started = time.monotonic()
            with http.stream("POST", f"{engine.url}/v1/text-to-speech/{VOICE_ID}/stream", json={"text": TEXT},
                             params={"output_format": output_format}) as response:
                next(response.iter_raw())
                elapsed = time.monotonic() - started
    return elapsed


@pytest.mark.parametrize(("fmt", "chunk_size"), [("pcm", 10_000), ("mp3", 4_000), ("opus", 10_000)])
def test_first_bytes_arrive_before_the_engine_finishes(client: openai.OpenAI, engine: FakeElevenLabs, fmt: str,
                                                       chunk_size: int) -> None:
    engine.chunk_size, engine.chunk_delay = chunk_size, 0.08  # 3.1 s of audio in 13-15 chunks: ~1.1 s of sending
    native = "mp3_44100_128" if fmt == "mp3" else "pcm_24000"
    synth(native, speech_seconds(TEXT))  # both runs below find the double's audio made
    direct = first_byte_direct(engine, native)
    started = time.monotonic()
    first = None
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice="nova", input=TEXT,
                                                            response_format=fmt) as response:  # type: ignore[arg-type]
        for _ in response.iter_bytes():
            first = first or time.monotonic()
    done = engine.finished[-1]
    assert first is not None and first < done - 0.5, (first - started, done - started)
    print(f"\n{fmt}: first byte through the gateway after {(first - started) * 1000:.0f} ms (direct from the "
          f"double: {direct * 1000:.0f} ms); the double finished sending after {(done - started) * 1000:.0f} ms")


# -- transcription -----------------------------------------------------------------------------------------


def test_transcription_sends_the_documented_request(client: openai.OpenAI, engine: FakeElevenLabs) -> None:
    assert transcribe(client, language="en", temperature=0.2).text == "The quick brown fox jumps. Then it sleeps."  # type: ignore[attr-defined]
    [rec] = engine.requests
    assert (rec.method, rec.path, rec.query) == ("POST", "/v1/speech-to-text", {})
    assert rec.headers["xi-api-key"] == ENGINE_KEY and "Authorization" not in rec.headers
    assert not any(DEMO_KEY in value for value in rec.headers.values())
    assert rec.headers["Content-Type"].startswith("multipart/form-data")
    assert rec.headers["Accept-Encoding"] == "identity"  # else the double compresses its JSON, as a CDN may
    assert rec.form == [("model_id", "scribe_v1"), ("language_code", "en"), ("temperature", "0.2"),
                        ("timestamps_granularity", "word"), ("tag_audio_events", "false")]
    assert rec.files == [("file", "talk.wav", "audio/wav", WAV)]


def test_verbose_json_has_scribe_words_grouped_into_segments(client: openai.OpenAI) -> None:
    raw = client.audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=("talk.wav", WAV, "audio/wav"), response_format="verbose_json",
        timestamp_granularities=["word", "segment"])
    verbose = TranscriptionVerbose.model_validate(json.loads(raw.content))
    assert verbose.language == "english"  # from Scribe's ISO-639-3 "eng"
    assert verbose.duration == pytest.approx(4.0, abs=0.01)  # audio_duration_secs
    assert [w.word for w in verbose.words or []] == ["The", "quick", "brown", "fox", "jumps", "Then", "it", "sleeps"]
    assert (verbose.words or [])[0].start == pytest.approx(0.1)
    segments = [(s.text.strip(), s.start, s.end) for s in verbose.segments or []]
    assert segments == [("The quick brown fox jumps.", pytest.approx(0.1), pytest.approx(1.5)),
                        ("Then it sleeps.", pytest.approx(2.8), pytest.approx(3.7))]


@pytest.mark.parametrize("fmt", ["json", "text", "srt", "vtt"])
def test_every_transcript_format(client: openai.OpenAI, fmt: str) -> None:
    body = client.audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=("talk.wav", WAV, "audio/wav"), response_format=fmt).content.decode()  # type: ignore[arg-type]
    if fmt == "json":
        assert json.loads(body)["text"] == "The quick brown fox jumps. Then it sleeps."
    elif fmt == "text":
        assert body.strip() == "The quick brown fox jumps. Then it sleeps."
    elif fmt == "srt":
        cues = [(c.start.total_seconds(), c.end.total_seconds(), c.content) for c in srt.parse(body)]
        assert cues == [(0.1, 1.5, "The quick brown fox jumps."), (2.8, 3.7, "Then it sleeps.")]
    else:
        cues = [(c.start, c.end, c.text) for c in webvtt.from_buffer(io.StringIO(body))]
        assert cues == [("00:00:00.100", "00:00:01.500", "The quick brown fox jumps."),
                        ("00:00:02.800", "00:00:03.700", "Then it sleeps.")]


def test_translation_is_refused_cleanly_without_calling_the_engine(client: openai.OpenAI,
                                                                   engine: FakeElevenLabs) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.translations.create(model="whisper-1", file=("talk.wav", WAV, "audio/wav"))
    expect_error(info.value, 400, "invalid_request_error", "unsupported_task", "model", message="translation")
    assert engine.requests == []


# -- errors ------------------------------------------------------------------------------------------------


def call(client: openai.OpenAI, task: str) -> object:
    return speak(client, "pcm") if task == "speech" else transcribe(client)


@pytest.mark.parametrize("task", ["speech", "transcription"])
def test_exhausted_quota_is_502_naming_the_quota(client: openai.OpenAI, engine: FakeElevenLabs, task: str) -> None:
    engine.mode = "quota"
    with pytest.raises(openai.InternalServerError) as info:
        call(client, task)
    error = expect_error(info.value, 502, "upstream_error", "bad_gateway", secrets=SECRETS)
    assert error["message"] == "Backend 'eleven' has used up its ElevenLabs quota."
    assert info.value.response.headers["x-should-retry"] == "false"


@pytest.mark.parametrize(("task", "mode", "param", "message"), [
    ("speech", "422", "input", "Field required"),
    ("transcription", "422", "file", "Field required"),
    ("speech", "400", "input", "Text is too long"),
])
def test_engine_validation_errors_are_400_naming_the_openai_field(client: openai.OpenAI, engine: FakeElevenLabs,
                                                                  task: str, mode: str, param: str,
                                                                  message: str) -> None:
    engine.mode = mode
    with pytest.raises(openai.BadRequestError) as info:
        call(client, task)
    error = expect_error(info.value, 400, "invalid_request_error", None, param, secrets=(ENGINE_KEY,))
    assert error["message"].startswith(f"Backend 'eleven' rejected the request: {message}")


def test_unknown_voice_is_400_naming_voice(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.speech.create(model="tts-1", voice="alloy", input="Hi.", response_format="mp3")
    expect_error(info.value, 400, "invalid_request_error", None, "voice", message="alloy was not found")


# -- readiness and configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(("extra", "problem"), [
    ("colour: blue", "backends.eleven.colour: unknown option"),
    ("voice_settings: {speed: 1.1}", "backends.eleven.voice_settings.speed:"),
    ("voice_settings: {stability: 2}", "backends.eleven.voice_settings.stability: expected a number from 0 to 1"),
    ("voice_settings: [1]", "backends.eleven.voice_settings: expected a mapping"),
    ("optimize_streaming_latency: 9", "backends.eleven.optimize_streaming_latency:"),
    ("enable_logging: nope", "backends.eleven.enable_logging: expected true or false"),
])
async def test_bad_options_are_config_errors_by_path(tmp_path: Path, extra: str, problem: str) -> None:
    parsed = parse_config(config("http://127.0.0.1:9", tmp_path, extra), kinds=ADAPTERS.keys())
    with pytest.raises(ConfigError) as info:
        await build_adapters(parsed, upstreams := Upstreams())
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems
    assert not upstreams.sessions()  # the refused backend's pool is closed again


def test_default_url_is_elevenlabs() -> None:
    adapter = ElevenLabsAdapter(Backend("eleven", "elevenlabs"), None)  # type: ignore[arg-type]
    assert adapter.url == "https://api.elevenlabs.io"


def test_example_config_checks(tmp_path: Path) -> None:
    example = ROOT / "config" / "examples" / "elevenlabs.yaml"
    run = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(example)], cwd=ROOT,
                         capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "DEMO_KEY": DEMO_KEY})
    assert run.returncode == 0, run.stdout + run.stderr
