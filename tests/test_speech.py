"""POST /v1/audio/speech through the gateway to an OpenAI-compatible engine, with the official SDK."""

from __future__ import annotations

import base64
import json
import time

import openai
import pytest

from tests.conftest import DEMO_KEY, ENGINE_KEY, Gateway, sdk
from tests.fakes.openai_engine import CONTENT_TYPES, FakeOpenAIEngine, speech_seconds, synth


def test_speech_rewrites_model_voice_and_credential(client: openai.OpenAI, engine: FakeOpenAIEngine) -> None:
    audio = client.audio.speech.create(model="tts-1", voice="nova", input="Hello there.",
                                       response_format="wav", speed=1.5, instructions="cheerful")
    assert audio.content[:4] == b"RIFF"
    sent = engine.last
    assert sent.path == "/v1/audio/speech"
    assert sent.json == {"model": "kokoro", "voice": "af_nova", "input": "Hello there.",
                         "response_format": "wav", "speed": 1.5, "instructions": "cheerful"}
    assert sent.headers["Authorization"] == f"Bearer {ENGINE_KEY}"
    assert DEMO_KEY not in json.dumps(dict(sent.headers))
    assert "X-Api-Key" not in sent.headers
    assert sent.headers["X-Request-ID"] == audio.response.headers["x-request-id"]


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_speech_formats_relay_bytes_and_content_type(client: openai.OpenAI, engine: FakeOpenAIEngine,
                                                     fmt: str) -> None:
    audio = client.audio.speech.create(model="tts-1", voice="alloy", input="Format test.", response_format=fmt)
    assert audio.response.headers["content-type"] == CONTENT_TYPES[fmt]
    assert engine.last.json["response_format"] == fmt
    assert audio.content == synth(fmt, speech_seconds("Format test."))  # passed through untouched


def test_unknown_voice_passes_through(client: openai.OpenAI, engine: FakeOpenAIEngine) -> None:
    client.audio.speech.create(model="tts-1", voice="bf_emma", input="Hi.")
    assert engine.last.json["voice"] == "bf_emma"


def test_voice_object_and_unknown_fields_forwarded(client: openai.OpenAI, engine: FakeOpenAIEngine) -> None:
    client.audio.speech.create(model="tts-1", voice={"id": "nova"}, input="Hi.",  # type: ignore[arg-type]
                               extra_body={"lang_code": "a"})
    assert engine.last.json["voice"] == "af_nova"
    assert engine.last.json["lang_code"] == "a"


def test_streaming_response_arrives_chunk_by_chunk(client: openai.OpenAI, engine: FakeOpenAIEngine) -> None:
    engine.chunk_size, engine.chunk_delay = 8192, 0.05
    text = "Streaming speech " * 5
    started = time.monotonic()
    arrivals: list[float] = []
    total = 0
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="nova", input=text, response_format="pcm") as response:
        assert response.headers.get("transfer-encoding") == "chunked"
        for chunk in response.iter_bytes(2048):
            arrivals.append(time.monotonic() - started)
            total += len(chunk)
    expected = int(speech_seconds(text) * 24_000) * 2
    assert total == expected
    # the first bytes arrive before the engine has written its last chunk (an order, not a ratio of times)
    assert started + arrivals[0] < engine.finished[-1]


async def test_async_client_streams(aclient: openai.AsyncOpenAI) -> None:
    async with aclient.audio.speech.with_streaming_response.create(
            model="tts-1", voice="nova", input="Async hello.", response_format="mp3") as response:
        body = b"".join([c async for c in response.iter_bytes()])
    assert response.headers["content-type"] == "audio/mpeg"
    assert len(body) > 100


def test_sse_relayed_from_engine(client: openai.OpenAI, engine: FakeOpenAIEngine) -> None:
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="nova", input="Events please.", response_format="pcm",
            stream_format="sse") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert engine.last.json["stream_format"] == "sse"
    assert events[-1]["type"] == "speech.audio.done"
    audio = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    assert len(audio) == int(speech_seconds("Events please.") * 24_000) * 2


def test_x_api_key_header_accepted(gateway: Gateway, engine: FakeOpenAIEngine) -> None:
    with sdk(gateway.base_url, "unused",
             default_headers={"Authorization": "", "X-API-Key": DEMO_KEY}) as c:
        audio = c.audio.speech.create(model="tts-1", voice="nova", input="Key in a header.")
    assert len(audio.content) > 100
    assert DEMO_KEY not in json.dumps(dict(engine.last.headers))
