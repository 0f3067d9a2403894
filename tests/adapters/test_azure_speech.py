"""The Azure AI Speech adapter through the gateway with the official SDK, against a double of Azure's REST APIs:
the exact requests sent (SSML with the escaped input, voice and prosody; output format; key header;
multipart fast transcription with its definition), every speech format, native and stretched speed,
streaming, every transcript format and no translation.
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

from gateway.adapters.azure_speech import OUTPUT_FORMATS, AzureSpeechAdapter, ssml
from gateway.config import Backend
from tests.adapters.common import (
    probe,
    serve,
)
from tests.conftest import DEMO_KEY, ENGINE_KEY, Gateway, ServerThread, sdk, sha
from tests.fakes.azure_speech_engine import FakeAzureSpeech, speech_seconds
from tests.fakes.deepgram_engine import tone
from tests.support import expect_error

pytestmark = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
SENTENCE = "Hello from the gateway. This sentence is spoken by an Azure neural voice."
VOICE = "en-US-AvaMultilingualNeural"
CODECS = {"mp3": ("mp3", "mp3"), "opus": ("ogg", "opus"), "aac": ("aac", "aac"), "flac": ("flac", "flac"),
          "wav": ("wav", "pcm_s16le")}
UPLOAD = tone(2.0, 16_000, "mp3", "libmp3lame")
SEGMENTS = ["Hello there.", "The quick brown fox jumps over the lazy dog."]


def config(url: str, spool: Path, extra: str = "") -> str:
    return textwrap.dedent(f"""
        server: {{spool_dir: {spool}, max_upload_bytes: 2000000, spool_memory_bytes: 65536}}
        keys:
          - {{name: demo, tenant: acme, sha256: "{sha(DEMO_KEY)}"}}
        backends:
          azure: {{kind: azure_speech, url: "{url}", api_key: "{ENGINE_KEY}",
                   timeout_s: 1, connect_timeout_s: 1{extra}}}
        models:
          tts-1: {{task: speech, routes: [{{backend: azure, model: neural}}]}}
          whisper-1: {{task: transcription, routes: [{{backend: azure, model: fast-transcription}}]}}
        voices:
          nova: {{azure: {VOICE}}}
          onyx: {{azure: en-US-AndrewNeural}}
    """)


@pytest.fixture
def engine(servers: ServerThread) -> Iterator[FakeAzureSpeech]:
    yield from serve(servers, FakeAzureSpeech(expected_api_key=ENGINE_KEY))


@pytest.fixture
def gateway(make_gateway: Callable[[str], Gateway], engine: FakeAzureSpeech, tmp_path: Path) -> Gateway:
    return make_gateway(config(engine.url, tmp_path / "spool"))


def seconds_of(data: bytes, fmt: str) -> float:
    return len(data) / 48_000 if fmt == "pcm" else probe(data)[3]


def speak(c: openai.OpenAI, **kw: Any) -> bytes:
    return c.audio.speech.create(**{"model": "tts-1", "voice": "nova", "input": SENTENCE,
                                    "response_format": "mp3", **kw}).content


def transcribe(c: openai.OpenAI, **kw: Any) -> Any:
    return c.audio.transcriptions.create(**{"model": "whisper-1", "file": ("hello.mp3", UPLOAD, "audio/mpeg"),
                                            **kw})


# -- speech ---------------------------------------------------------------------------------------------------


def test_the_request_is_documented_ssml_with_the_key_header(client: openai.OpenAI, engine: FakeAzureSpeech) -> None:
    speak(client, input="Tom & Jerry say \"<hi>\" and 'bye'.")
    sent = engine.last
    assert (sent.method, sent.path, sent.query) == ("POST", "/cognitiveservices/v1", {})
    assert sent.headers["Ocp-Apim-Subscription-Key"] == ENGINE_KEY
    assert sent.headers["Content-Type"] == "application/ssml+xml"
    assert sent.headers["X-Microsoft-OutputFormat"] == "audio-24khz-96kbitrate-mono-mp3"
    assert sent.headers["User-Agent"] == "openai-audio-gateway"
    assert "Authorization" not in sent.headers and DEMO_KEY not in json.dumps(dict(sent.headers))
    assert sent.body.decode() == (
        "<speak version='1.0' xmlns='http://www.w3.org/2001/10/synthesis' xml:lang='en-US'>"
        f"<voice name='{VOICE}'>Tom &amp; Jerry say \"&lt;hi&gt;\" and 'bye'.</voice></speak>")
    assert engine.spoken[-1] == (VOICE, "Tom & Jerry say \"<hi>\" and 'bye'.", 1.0)  # the double read it back


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_every_format(client: openai.OpenAI, engine: FakeAzureSpeech, fmt: str) -> None:
    audio = speak(client, response_format=fmt)
    native = fmt if fmt in OUTPUT_FORMATS else "pcm"  # aac and flac: raw PCM, encoded by the gateway
    assert engine.last.headers["X-Microsoft-OutputFormat"] == OUTPUT_FORMATS[native]
    assert engine.last.body == ssml(SENTENCE, VOICE).encode()
    if fmt in OUTPUT_FORMATS:
        assert audio == engine.sent[-1]  # passed through untouched
    if fmt != "pcm":
        assert probe(audio)[:2] == CODECS[fmt]
    assert seconds_of(audio, fmt) == pytest.approx(speech_seconds(SENTENCE), rel=0.1)


@pytest.mark.parametrize(("speed", "rate"), [(2.0, "+100.00%"), (0.5, "-50.00%"), (1.25, "+25.00%")])
def test_speed_within_half_to_double_is_ssml_prosody(client: openai.OpenAI, engine: FakeAzureSpeech, speed: float,
                                                     rate: str) -> None:
    audio = speak(client, response_format="wav", speed=speed)
    assert f"<voice name='{VOICE}'><prosody rate='{rate}'>{SENTENCE}</prosody></voice>" in engine.last.body.decode()
    assert audio == engine.sent[-1]  # Azure did it; the gateway did not stretch
    assert probe(audio)[3] == pytest.approx(speech_seconds(SENTENCE) / speed, rel=0.1)


@pytest.mark.parametrize("speed", [4.0, 0.25])
def test_speed_beyond_prosody_is_stretched_by_the_gateway(client: openai.OpenAI, engine: FakeAzureSpeech,
                                                          speed: float) -> None:
    audio = speak(client, response_format="wav", speed=speed)
    assert "prosody" not in engine.last.body.decode()
    assert probe(audio)[3] == pytest.approx(speech_seconds(SENTENCE) / speed, rel=0.1)


def test_first_bytes_reach_the_client_before_azure_finishes(servers: ServerThread, client: openai.OpenAI,
                                                            engine: FakeAzureSpeech) -> None:
    engine.chunk_size, engine.chunk_delay = 16_384, 0.05
    text = SENTENCE * 3
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
        headers = {"Ocp-Apim-Subscription-Key": ENGINE_KEY, "Content-Type": "application/ssml+xml",
                   "X-Microsoft-OutputFormat": OUTPUT_FORMATS["pcm"], "User-Agent": "test"}
        async with aiohttp.ClientSession() as s, s.post(f"{engine.url}/cognitiveservices/v1", headers=headers,
                                                        data=ssml(text, VOICE)) as r:
            await r.content.readany()
            return time.monotonic() - began

    print(f"\nazure pcm: first byte through the gateway {ttfb * 1000:.1f} ms, direct "
          f"{servers.run(direct()) * 1000:.1f} ms; the double sent its last byte after {finished * 1000:.0f} ms")


def test_voice_locale_and_hostile_voice_names() -> None:
    assert "xml:lang='de-DE'><voice name='de-DE-KatjaNeural'>" in ssml("Hallo", "de-DE-KatjaNeural")
    assert "xml:lang='en-US'><voice name='x&apos;/&gt;&lt;y'>" in ssml("Hi", "x'/><y")
    assert ssml("bell\x07 tab\t", VOICE).endswith(">bell tab\t</voice></speak>")


def test_unknown_voice_is_azures_400(client: openai.OpenAI, engine: FakeAzureSpeech) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        speak(client, voice="en-US-NobodyNeural")
    expect_error(info.value, 400, "invalid_request_error", None, secrets=(ENGINE_KEY,))
    assert "name='en-US-NobodyNeural'" in engine.last.body.decode()


# -- transcription -------------------------------------------------------------------------------------------


def test_fast_transcription_request(client: openai.OpenAI, engine: FakeAzureSpeech) -> None:
    result = transcribe(client, language="en")
    sent = engine.last
    assert (sent.method, sent.path) == ("POST", "/speechtotext/transcriptions:transcribe")
    assert sent.query == {"api-version": "2024-11-15"}
    assert sent.headers["Ocp-Apim-Subscription-Key"] == ENGINE_KEY
    assert sent.headers["Content-Type"].startswith("multipart/form-data")
    assert DEMO_KEY not in json.dumps(dict(sent.headers))
    assert sent.files == [("audio", "hello.mp3", "audio/mpeg", UPLOAD)]  # the original file, untouched
    assert json.loads(sent.form_value("definition") or "") == {"locales": ["en-US"]}
    assert result.text == engine.transcript_text


@pytest.mark.parametrize(("language", "locales"), [(None, None), ("de", ["de-DE"]), ("pt-PT", ["pt-PT"]),
                                                   ("sw", None)])
def test_language_becomes_a_locale(client: openai.OpenAI, engine: FakeAzureSpeech, language: str | None,
                                   locales: list[str] | None) -> None:
    transcribe(client, **({"language": language} if language else {}))
    definition = json.loads(engine.last.form_value("definition") or "")
    assert definition.get("locales") == locales


def test_locale_options(make_gateway: Callable[[str], Gateway], engine: FakeAzureSpeech, tmp_path: Path) -> None:
    extra = ", locales: {en: en-GB}, default_locales: [en-US, de-DE], definition: {profanityFilterMode: None}"
    gw = make_gateway(config(engine.url, tmp_path / "spool", extra))
    with sdk(gw.base_url) as c:
        transcribe(c, language="en")
        assert json.loads(engine.last.form_value("definition") or "") == {"profanityFilterMode": "None",
                                                                          "locales": ["en-GB"]}
        transcribe(c)
        assert json.loads(engine.last.form_value("definition") or "")["locales"] == ["en-US", "de-DE"]


def test_verbose_json_has_words_segments_and_duration(client: openai.OpenAI, engine: FakeAzureSpeech) -> None:
    raw = client.audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=("hello.mp3", UPLOAD, "audio/mpeg"), response_format="verbose_json",
        timestamp_granularities=["word", "segment"])
    verbose = TranscriptionVerbose.model_validate(json.loads(raw.content))
    assert verbose.duration == pytest.approx(2.0, abs=0.06)  # the double decoded the mp3 itself
    assert verbose.language == "english"  # from the phrases' locale, en-US
    assert verbose.text == engine.transcript_text
    assert [s.text.strip() for s in verbose.segments or []] == SEGMENTS
    assert [w.word for w in verbose.words or []] == [w.strip(".") for w in engine.transcript_text.split()]
    assert all(0 <= w.start < w.end <= 2.0 for w in verbose.words or [])


@pytest.mark.parametrize("fmt", ["json", "text", "srt", "vtt"])
def test_every_transcript_format(client: openai.OpenAI, engine: FakeAzureSpeech, fmt: str) -> None:
    result = transcribe(client, response_format=fmt)
    if fmt == "json":
        assert result.text == engine.transcript_text
    elif fmt == "text":
        assert result.strip() == engine.transcript_text
    elif fmt == "srt":
        cues = list(srt.parse(result))
        assert [c.content.replace("\n", " ") for c in cues] == SEGMENTS
        assert 0 <= cues[0].start.total_seconds() < cues[-1].end.total_seconds() <= 2.0
    else:
        assert [c.text.replace("\n", " ") for c in webvtt.from_buffer(io.StringIO(result)).captions] == SEGMENTS


def test_translation_is_a_clean_400(client: openai.OpenAI, engine: FakeAzureSpeech) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.translations.create(model="whisper-1", file=("hello.mp3", UPLOAD, "audio/mpeg"))
    expect_error(info.value, 400, "invalid_request_error", "unsupported_task", "model")
    assert engine.requests == []


# -- readiness and configuration ------------------------------------------------------------------------------


def test_region_and_url_options() -> None:
    regional = AzureSpeechAdapter(Backend("az", "azure_speech", options={"region": "westeurope"}), None)  # type: ignore[arg-type]
    assert regional.tts_url == "https://westeurope.tts.speech.microsoft.com"
    assert regional.stt_url == "https://westeurope.api.cognitive.microsoft.com"
    explicit = AzureSpeechAdapter(Backend("az", "azure_speech", url="http://speech.internal:5000",
                                          options={"region": "westeurope"}), None)  # type: ignore[arg-type]
    assert explicit.tts_url == explicit.stt_url == "http://speech.internal:5000"
    split = AzureSpeechAdapter(Backend("az", "azure_speech", options={
        "region": "eastus", "stt_url": "https://my-speech.cognitiveservices.azure.com/"}), None)  # type: ignore[arg-type]
    assert split.tts_url == "https://eastus.tts.speech.microsoft.com"
    assert split.stt_url == "https://my-speech.cognitiveservices.azure.com"


@pytest.mark.parametrize(("options", "problem"), [
    ({}, "backends.az.region: required"),
    ({"region": "West Europe"}, "backends.az.region: expected an Azure region"),
    ({"region": "eastus", "bogus": 1}, "backends.az.bogus: unknown option for kind .azure_speech."),
    ({"region": "eastus", "stt_url": "ftp://x"}, "backends.az.stt_url: expected an http"),
    ({"region": "eastus", "locales": ["en-US"]}, "backends.az.locales: expected a mapping"),
    ({"region": "eastus", "default_locales": "en-US"}, "backends.az.default_locales: expected a list"),
    ({"region": "eastus", "definition": "x"}, "backends.az.definition: expected a mapping"),
])
def test_bad_options_are_config_errors(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        AzureSpeechAdapter(Backend("az", "azure_speech", options=options), None)  # type: ignore[arg-type]
