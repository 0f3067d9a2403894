"""POST /v1/audio/transcriptions and /v1/audio/translations through the gateway, with the official SDK."""

from __future__ import annotations

import io
import json

import openai
import pytest
import srt
import webvtt
from openai.types.audio import (
    Transcription,
    TranscriptionTextDeltaEvent,
    TranscriptionTextDoneEvent,
    TranscriptionVerbose,
    Translation,
    TranslationVerbose,
)

from gateway.transcript import bare
from tests.conftest import DEMO_KEY, ENGINE_KEY, Gateway
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.support import WAV

NATIVE = "Systran/faster-whisper-small"
TEXT = "The quick brown fox jumps over the lazy dog."
pytestmark = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")


def _assert_credentials(engine: FakeOpenAIEngine) -> None:
    headers = engine.last.headers
    assert headers["Authorization"] == f"Bearer {ENGINE_KEY}"
    assert DEMO_KEY not in json.dumps(dict(headers))
    assert DEMO_KEY.encode() not in engine.last.body
    assert all(DEMO_KEY not in v for _, v in engine.last.form)
    assert "X-Api-Key" not in headers


def test_json_transcription_relays_file_and_rewrites_model(client: openai.OpenAI, engine: FakeOpenAIEngine) -> None:
    result = client.audio.transcriptions.create(model="whisper-1", file=("meeting.wav", WAV, "audio/wav"))
    assert isinstance(result, Transcription)
    assert result.text == TEXT
    sent = engine.last
    assert sent.path == "/v1/audio/transcriptions"
    assert sent.form_value("model") == NATIVE
    assert sent.form_values("model") == [NATIVE]
    assert sent.files == [("file", "meeting.wav", "audio/wav", WAV)]
    assert sent.form_value("response_format") == "json"
    _assert_credentials(engine)


def test_all_fields_forwarded_intact(client: openai.OpenAI, engine: FakeOpenAIEngine) -> None:
    client.audio.transcriptions.create(
        model="whisper-1", file=("a.wav", WAV, "audio/wav"), response_format="json", language="en",
        prompt="Names: Zoë, Ødegaard, 東京.", temperature=0.2, include=["logprobs"],
        extra_body={"vad_filter": "true", "chunking_strategy": {"type": "server_vad", "threshold": 0.5},
                    "hotwords": ["gateway", "aiohttp"]})
    sent = engine.last
    assert sent.form_value("language") == "en"
    assert sent.form_value("prompt") == "Names: Zoë, Ødegaard, 東京."
    assert float(sent.form_value("temperature") or "nan") == 0.2
    assert sent.form_values("include[]") == ["logprobs"]
    assert sent.form_value("vad_filter") == "true"
    assert sent.form_value("chunking_strategy[type]") == "server_vad"
    assert sent.form_value("chunking_strategy[threshold]") == "0.5"
    assert sent.form_values("hotwords[]") == ["gateway", "aiohttp"]
    assert sent.files[0][3] == WAV


def test_verbose_json_with_word_and_segment_timestamps(client: openai.OpenAI, engine: FakeOpenAIEngine) -> None:
    result = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", WAV, "audio/wav"),
                                                response_format="verbose_json",
                                                timestamp_granularities=["word", "segment"])
    assert isinstance(result, TranscriptionVerbose)
    assert engine.last.form_values("timestamp_granularities[]") == ["word", "segment"]
    assert engine.last.form_value("response_format") == "verbose_json"
    assert result.text == TEXT
    assert result.language == "english"
    assert result.words is not None and [w.word for w in result.words] == [bare(w) for w in TEXT.split()]
    assert result.words[1].start > result.words[0].start
    assert result.segments and result.segments[0].tokens  # relayed as the engine wrote it, words made bare
    assert result.segments and result.segments[0].text.strip() == TEXT


def test_verbose_json_defaults_to_segments(client: openai.OpenAI, engine: FakeOpenAIEngine) -> None:
    result = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", WAV, "audio/wav"),
                                                response_format="verbose_json")
    assert isinstance(result, TranscriptionVerbose)
    assert engine.last.form_values("timestamp_granularities[]") == ["segment"]
    assert result.words is None
    assert result.segments


@pytest.mark.parametrize("fmt", ["text", "srt", "vtt"])
def test_text_formats_are_strings(client: openai.OpenAI, engine: FakeOpenAIEngine, fmt: str) -> None:
    raw = client.audio.transcriptions.with_raw_response.create(model="whisper-1", file=("a.wav", WAV, "audio/wav"),
                                                               response_format=fmt)
    result = raw.parse()
    assert isinstance(result, str)
    assert raw.headers["content-type"].startswith("text/plain")
    assert engine.last.form_value("response_format") == fmt
    if fmt == "text":
        assert result.strip() == TEXT
    elif fmt == "srt":
        cues = list(srt.parse(result))
        assert " ".join(c.content for c in cues) == TEXT
    else:
        assert result.startswith("WEBVTT")
        cues = list(webvtt.from_buffer(io.StringIO(result)))
        assert " ".join(c.text for c in cues) == TEXT


def test_json_content_type(client: openai.OpenAI) -> None:
    raw = client.audio.transcriptions.with_raw_response.create(model="whisper-1", file=("a.wav", WAV, "audio/wav"))
    assert raw.headers["content-type"].startswith("application/json")
    assert raw.headers["x-request-id"]


def test_nameless_buffer_and_unicode_filename(client: openai.OpenAI, engine: FakeOpenAIEngine) -> None:
    client.audio.transcriptions.create(model="whisper-1", file=io.BytesIO(WAV))
    assert engine.last.files[0][1:] == ("upload", "application/octet-stream", WAV)
    client.audio.transcriptions.create(model="whisper-1", file=("réunion du 1er.wav", WAV, "audio/wav"))
    assert engine.last.files[0][1] == "réunion du 1er.wav"


@pytest.mark.parametrize(("fmt", "kind"), [("json", Translation), ("verbose_json", TranslationVerbose), ("text", str),
                                           ("srt", str), ("vtt", str)])
def test_translations(client: openai.OpenAI, engine: FakeOpenAIEngine, fmt: str, kind: type) -> None:
    result = client.audio.translations.create(model="whisper-1", file=("de.wav", WAV, "audio/wav"),
                                              response_format=fmt, prompt="Hallo.", temperature=0)  # type: ignore[call-overload]
    assert isinstance(result, kind)
    sent = engine.last
    assert sent.path == "/v1/audio/translations"
    assert sent.form_value("model") == NATIVE
    assert sent.form_value("prompt") == "Hallo."
    assert sent.form_value("response_format") == fmt
    assert sent.form_value("language") is None
    assert sent.files == [("file", "de.wav", "audio/wav", WAV)]
    text = result if isinstance(result, str) else result.text
    assert "quick brown fox" in text
    _assert_credentials(engine)


def test_stream_passthrough(client: openai.OpenAI, engine: FakeOpenAIEngine) -> None:
    stream = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", WAV, "audio/wav"), stream=True)
    events = list(stream)
    assert engine.last.form_value("stream") == "true"
    deltas = [e for e in events if isinstance(e, TranscriptionTextDeltaEvent)]
    assert len(deltas) == len(TEXT.split())
    assert "".join(d.delta for d in deltas) == TEXT
    assert isinstance(events[-1], TranscriptionTextDoneEvent)
    assert events[-1].text == TEXT


def test_stream_response_headers(client: openai.OpenAI) -> None:
    with client.audio.transcriptions.with_streaming_response.create(
            model="whisper-1", file=("a.wav", WAV, "audio/wav"), stream=True) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"]
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[-1][6:])["type"] == "transcript.text.done"


def test_stream_false_is_a_plain_answer(client: openai.OpenAI, engine: FakeOpenAIEngine) -> None:
    result = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", WAV, "audio/wav"), stream=False)
    assert isinstance(result, Transcription)
    assert engine.last.form_value("stream") is None


async def test_async_client_formats(aclient: openai.AsyncOpenAI, engine: FakeOpenAIEngine) -> None:
    result = await aclient.audio.transcriptions.create(model="whisper-1", file=("a.wav", WAV, "audio/wav"))
    assert isinstance(result, Transcription) and result.text == TEXT
    verbose = await aclient.audio.transcriptions.create(model="whisper-1", file=("a.wav", WAV, "audio/wav"),
                                                        response_format="verbose_json",
                                                        timestamp_granularities=["word", "segment"])
    assert isinstance(verbose, TranscriptionVerbose) and verbose.words and verbose.segments
    subtitles = await aclient.audio.transcriptions.create(model="whisper-1", file=("a.wav", WAV, "audio/wav"),
                                                          response_format="srt")
    assert isinstance(subtitles, str) and "-->" in subtitles
    translation = await aclient.audio.translations.create(model="whisper-1", file=("a.wav", WAV, "audio/wav"))
    assert isinstance(translation, Translation) and translation.text == TEXT
    assert engine.last.files[0][3] == WAV
    _assert_credentials(engine)


async def test_async_stream(aclient: openai.AsyncOpenAI, engine: FakeOpenAIEngine) -> None:
    stream = await aclient.audio.transcriptions.create(model="whisper-1", file=("a.wav", WAV, "audio/wav"),
                                                       stream=True)
    events = [e async for e in stream]
    assert [e.type for e in events][-1] == "transcript.text.done"
    assert "".join(e.delta for e in events if isinstance(e, TranscriptionTextDeltaEvent)) == TEXT
    assert engine.last.form_value("stream") == "true"


def test_large_upload_spooled_to_disk_arrives_intact(client: openai.OpenAI, gateway: Gateway,
                                                     engine: FakeOpenAIEngine) -> None:
    data = WAV + bytes(range(256)) * 4000  # ~1 MB, far over spool_memory_bytes
    result = client.audio.transcriptions.create(model="whisper-1", file=("long.wav", data, "audio/wav"))
    assert result.text == TEXT
    assert engine.last.files[0][3] == data


@pytest.mark.parametrize("fmt", ["text", "verbose_json"])
def test_long_transcript_arrives_whole(client: openai.OpenAI, engine: FakeOpenAIEngine, fmt: str) -> None:
    """A transcript too big for one socket read is relayed whole, not cut at the first read."""
    engine.transcript_text = " ".join(f"word{i}." for i in range(25_000))  # ~200 kB of text
    result = client.audio.transcriptions.create(model="whisper-1", file=("a.wav", WAV, "audio/wav"),
                                                response_format=fmt)  # type: ignore[call-overload]
    text = result if isinstance(result, str) else result.text
    assert text.strip() == engine.transcript_text
