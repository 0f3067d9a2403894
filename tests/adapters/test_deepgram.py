"""The Deepgram adapter through the gateway with the official SDK, against a double of Deepgram's REST API:
the exact requests sent (raw upload body, query options, `Token` credential), every speech format,
speed, streaming, long inputs, every transcript format and no translation.
The contract every HTTP engine keeps (refusals, rate limits, failures, hangs, drops, readiness) is
tests/adapters/test_http_contract.py."""

from __future__ import annotations

import io
import json
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import srt
import webvtt
from openai.types.audio import TranscriptionVerbose

from gateway.adapters.base import SPEECH, TRANSCRIPTION
from gateway.adapters.deepgram import SPEAK_FORMATS, DeepgramAdapter, split_text
from gateway.config import Backend
from gateway.transcript import bare
from tests.adapters.common import (
    probe,
    serve,
)
from tests.conftest import DEMO_KEY, ENGINE_KEY, Gateway, ServerThread, sdk, sha
from tests.fakes.deepgram_engine import FakeDeepgram, speech_seconds, tone
from tests.support import expect_error

pytestmark = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
SENTENCE = "Hello from the gateway. This sentence is spoken by Deepgram's Aura."
CODECS = {"mp3": ("mp3", "mp3"), "opus": ("ogg", "opus"), "aac": ("aac", "aac"), "flac": ("flac", "flac"),
          "wav": ("wav", "pcm_s16le")}
UPLOAD = tone(2.0, 16_000, "wav", "pcm_s16le")


def config(url: str, spool: Path) -> str:
    return textwrap.dedent(f"""
        server: {{spool_dir: {spool}, max_upload_bytes: 2000000, spool_memory_bytes: 65536}}
        keys:
          - {{name: demo, tenant: acme, sha256: "{sha(DEMO_KEY)}"}}
        backends:
          deepgram: {{kind: deepgram, url: "{url}", api_key: "{ENGINE_KEY}", timeout_s: 1, connect_timeout_s: 1}}
        models:
          tts-1: {{task: speech, routes: [{{backend: deepgram, model: aura-2}}]}}
          tts-family: {{task: speech, routes: [{{backend: deepgram, model: "aura-2-{{voice}}-en"}}]}}
          whisper-1: {{task: transcription, routes: [{{backend: deepgram, model: nova-3}}]}}
        voices:
          nova: {{deepgram: aura-2-thalia-en}}
          onyx: {{deepgram: zeus}}
    """)


@pytest.fixture
def engine(servers: ServerThread) -> Iterator[FakeDeepgram]:
    yield from serve(servers, FakeDeepgram(expected_api_key=ENGINE_KEY))


@pytest.fixture
def gateway(make_gateway: Callable[[str], Gateway], engine: FakeDeepgram, tmp_path: Path) -> Gateway:
    return make_gateway(config(engine.url, tmp_path / "spool"))


def seconds_of(data: bytes, fmt: str) -> float:
    return len(data) / 48_000 if fmt == "pcm" else probe(data)[3]


def assert_no_client_key(headers: Any) -> None:
    assert DEMO_KEY not in json.dumps(dict(headers))


def speak(c: openai.OpenAI, **kw: Any) -> bytes:
    return c.audio.speech.create(**{"model": "tts-1", "voice": "nova", "input": SENTENCE,
                                    "response_format": "mp3", **kw}).content


def transcribe(c: openai.OpenAI, **kw: Any) -> Any:
    return c.audio.transcriptions.create(**{"model": "whisper-1", "file": ("hello.wav", UPLOAD, "audio/wav"), **kw})


# -- speech ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_every_format_is_asked_for_natively_and_passed_through(client: openai.OpenAI, engine: FakeDeepgram,
                                                               fmt: str) -> None:
    audio = speak(client, response_format=fmt)
    sent = engine.last
    assert (sent.method, sent.path) == ("POST", "/v1/speak")
    assert sent.query == {"model": "aura-2-thalia-en", **SPEAK_FORMATS[fmt]}
    assert sent.json == {"text": SENTENCE}
    assert sent.headers["Authorization"] == f"Token {ENGINE_KEY}"
    assert sent.headers["Content-Type"] == "application/json"
    assert_no_client_key(sent.headers)
    assert audio == engine.sent[-1]  # untouched: Deepgram made exactly this format
    if fmt != "pcm":
        assert probe(audio)[:2] == CODECS[fmt]
    assert seconds_of(audio, fmt) == pytest.approx(speech_seconds(SENTENCE), rel=0.1)


def test_voice_template_in_the_route_model(client: openai.OpenAI, engine: FakeDeepgram) -> None:
    speak(client, model="tts-family", voice="onyx")
    assert engine.last.query["model"] == "aura-2-zeus-en"
    speak(client, voice="aura-2-andromeda-en")  # an unmapped voice is a native Aura model
    assert engine.last.query["model"] == "aura-2-andromeda-en"


@pytest.mark.parametrize("speed", [2.0, 0.5, 4.0])
def test_speed_is_stretched_by_the_gateway(client: openai.OpenAI, engine: FakeDeepgram, speed: float) -> None:
    audio = speak(client, response_format="wav", speed=speed)
    assert "speed" not in engine.last.query
    assert probe(audio)[3] == pytest.approx(speech_seconds(SENTENCE) / speed, rel=0.1)


def test_first_bytes_reach_the_client_before_deepgram_finishes(servers: ServerThread, client: openai.OpenAI,
                                                               engine: FakeDeepgram) -> None:
    engine.chunk_size, engine.chunk_delay = 16_384, 0.05
    text = SENTENCE * 3  # 12 s of 24 kHz PCM: 36 chunks, 1.75 s of sending
    started = time.monotonic()
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice="nova", input=text,
                                                            response_format="pcm") as response:
        chunks = response.iter_bytes()
        first = next(chunks)
        first_at = time.monotonic()
        ttfb = first_at - started
        total = len(first) + sum(len(c) for c in chunks)
    finished = engine.finished[-1] - started
    assert first and first_at < engine.finished[-1]  # before the engine wrote its last chunk: an order
    assert total == len(engine.sent[-1])

    async def direct() -> float:
        began = time.monotonic()
        async with aiohttp.ClientSession() as s, s.post(
                f"{engine.url}/v1/speak", params={"model": "aura-2-thalia-en", **SPEAK_FORMATS["pcm"]},
                json={"text": text}, headers={"Authorization": f"Token {ENGINE_KEY}"}) as r:
            await r.content.readany()
            return time.monotonic() - began

    print(f"\ndeepgram pcm: first byte through the gateway {ttfb * 1000:.1f} ms, direct "
          f"{servers.run(direct()) * 1000:.1f} ms; the double sent its last byte after {finished * 1000:.0f} ms")


def test_long_input_is_spoken_in_pieces_of_pcm(client: openai.OpenAI, engine: FakeDeepgram) -> None:
    text = " ".join(f"Sentence number {i} is here to make the input long." for i in range(80))  # ~4000 chars
    audio = speak(client, input=text, response_format="mp3")
    pieces = [r for r in engine.requests if r.path == "/v1/speak"]
    assert len(pieces) == 3
    assert all(len(r.json["text"]) <= 2000 and r.json["text"].endswith("long.") for r in pieces)
    assert " ".join(r.json["text"] for r in pieces) == text
    assert all(r.query == {"model": "aura-2-thalia-en", **SPEAK_FORMATS["pcm"]} for r in pieces)
    expected = sum(speech_seconds(r.json["text"]) for r in pieces)
    assert probe(audio)[:2] == ("mp3", "mp3") and probe(audio)[3] == pytest.approx(expected, rel=0.05)


def test_split_text() -> None:
    assert split_text("Short.", 100) == ["Short."]
    assert split_text("One. Two three four five. Six.", 12) == ["One.", "Two three", "four five.", "Six."]
    assert split_text("x" * 250, 100) == ["x" * 100, "x" * 100, "x" * 50]


# -- transcription -------------------------------------------------------------------------------------------


def test_upload_is_the_raw_body_with_query_options(client: openai.OpenAI, engine: FakeDeepgram) -> None:
    result = transcribe(client)
    sent = engine.last
    assert (sent.method, sent.path) == ("POST", "/v1/listen")
    assert sent.query == {"model": "nova-3", "smart_format": "true", "punctuate": "true", "utterances": "true",
                          "detect_language": "true"}
    assert sent.body == UPLOAD  # byte for byte, no multipart
    assert sent.headers["Content-Type"] == "audio/wav"
    assert sent.headers["Authorization"] == f"Token {ENGINE_KEY}"
    assert_no_client_key(sent.headers)
    assert result.text == engine.transcript_text


def test_language_is_passed_on(client: openai.OpenAI, engine: FakeDeepgram) -> None:
    result = transcribe(client, language="de", response_format="verbose_json")
    assert engine.last.query["language"] == "de" and "detect_language" not in engine.last.query
    assert result.language == "german"
    transcribe(client, language="pt-BR")
    assert engine.last.query["language"] == "pt-BR"


def test_verbose_json_has_words_segments_and_duration(client: openai.OpenAI, engine: FakeDeepgram) -> None:
    raw = client.audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=("hello.wav", UPLOAD, "audio/wav"), response_format="verbose_json",
        timestamp_granularities=["word", "segment"])
    verbose = TranscriptionVerbose.model_validate(json.loads(raw.content))
    assert verbose.duration == pytest.approx(2.0, abs=0.01)
    assert verbose.language == "english"
    assert verbose.text == engine.transcript_text
    assert [s.text.strip() for s in verbose.segments or []] == ["Hello there.",
                                                                 "The quick brown fox jumps over the lazy dog."]
    assert [w.word for w in verbose.words or []] == [bare(w) for w in engine.transcript_text.split()]  # as OpenAI's
    assert all(0 <= w.start < w.end <= 2.0 for w in verbose.words or [])


@pytest.mark.parametrize("fmt", ["json", "text", "srt", "vtt"])
def test_every_transcript_format(client: openai.OpenAI, engine: FakeDeepgram, fmt: str) -> None:
    result = transcribe(client, response_format=fmt)
    if fmt == "json":
        assert result.text == engine.transcript_text
    elif fmt == "text":
        assert result.strip() == engine.transcript_text
    elif fmt == "srt":
        cues = list(srt.parse(result))
        assert [c.content.replace("\n", " ") for c in cues] == ["Hello there.",
                                                               "The quick brown fox jumps over the lazy dog."]
        assert 0 <= cues[0].start.total_seconds() < cues[-1].end.total_seconds() <= 2.0
    else:
        captions = webvtt.from_buffer(io.StringIO(result)).captions
        assert [c.text.replace("\n", " ") for c in captions] == ["Hello there.",
                                                                "The quick brown fox jumps over the lazy dog."]


def test_translation_is_a_clean_400(client: openai.OpenAI, engine: FakeDeepgram) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.translations.create(model="whisper-1", file=("hello.wav", UPLOAD, "audio/wav"))
    expect_error(info.value, 400, "invalid_request_error", "unsupported_task", "model")
    assert engine.requests == []


# -- readiness and configuration ------------------------------------------------------------------------------


def test_capabilities() -> None:
    caps = DeepgramAdapter.capabilities
    assert caps.tasks == {SPEECH, TRANSCRIPTION} and caps.native_speed is None
    assert caps.speech_formats == set(SPEAK_FORMATS)


@pytest.mark.parametrize(("options", "problem"), [
    ({"bogus": 1}, "backends.dg.bogus: unknown option for kind .deepgram."),
    ({"listen_params": ["diarize"]}, "backends.dg.listen_params: expected a mapping"),
    ({"max_input_chars": 10}, "backends.dg.max_input_chars: expected an integer of at least 100"),
])
def test_bad_options_are_config_errors(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        DeepgramAdapter(Backend("dg", "deepgram", options=options), None)  # type: ignore[arg-type]


def test_listen_params_are_added(make_gateway: Callable[[str], Gateway], engine: FakeDeepgram,
                                 tmp_path: Path) -> None:
    text = config(engine.url, tmp_path / "spool").replace(
        "connect_timeout_s: 1}", "connect_timeout_s: 1, listen_params: {diarize: true, keyterm: Aura}}")
    gw = make_gateway(text)
    with sdk(gw.base_url) as c:
        transcribe(c)
    assert engine.last.query["diarize"] == "true" and engine.last.query["keyterm"] == "Aura"
