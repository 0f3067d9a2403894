"""Self-tests of the OpenAI-compatible engine double, driven over real HTTP with aiohttp."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import aiohttp
import av
import pytest

from tests.fakes.openai_engine import RATE, FakeOpenAIEngine, speech_seconds, synth

SPEECH = {"model": "tts-1", "input": "Hello there, general audio.", "voice": "alloy"}


def _audio_seconds(data: bytes) -> float:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        return sum(frame.samples for frame in container.decode(stream)) / stream.rate


def _form(**fields: str | list[str]) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in fields.items():
        for v in value if isinstance(value, list) else [value]:
            form.add_field(name, v)
    form.add_field("file", b"RIFF....WAVEfmt ", filename="a.wav", content_type="audio/wav")
    return form


def _events(body: bytes) -> list[dict]:
    return [json.loads(block[len(b"data: "):]) for block in body.split(b"\n\n") if block]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("fmt", "ctype"),
    [("mp3", "audio/mpeg"), ("opus", "audio/ogg"), ("aac", "audio/aac"), ("flac", "audio/flac"),
     ("wav", "audio/wav"), ("pcm", "audio/pcm")],
)
async def test_speech_formats_decode(fmt: str, ctype: str) -> None:
    async with FakeOpenAIEngine() as engine, aiohttp.ClientSession() as session:
        headers = {"Authorization": "Bearer sk-x", "X-Stainless-Lang": "python"}
        async with session.post(f"{engine.url}/audio/speech", json={**SPEECH, "response_format": fmt},
                                headers=headers) as resp:
            assert resp.status == 200
            assert resp.content_type == ctype
            assert resp.headers["x-request-id"] == "req_fake_1"
            data = await resp.read()
    expected = speech_seconds(SPEECH["input"])
    if fmt == "pcm":
        assert len(data) == int(RATE * expected) * 2
    else:
        assert _audio_seconds(data) == pytest.approx(expected, abs=0.1)
    rec = engine.last
    assert (rec.method, rec.path) == ("POST", "/v1/audio/speech")
    assert rec.json["response_format"] == fmt
    assert rec.headers["authorization"] == "Bearer sk-x"
    assert rec.headers["x-stainless-lang"] == "python"
    assert engine.active == 0


@pytest.mark.asyncio
async def test_speech_streams_in_chunks() -> None:
    async with FakeOpenAIEngine(chunk_size=8192, chunk_delay=0.03) as engine, aiohttp.ClientSession() as s:
        started = time.monotonic()
        async with s.post(f"{engine.url}/audio/speech", json={**SPEECH, "response_format": "wav"}) as resp:
            first = await resp.content.readany()
            first_at = time.monotonic() - started
            rest = await resp.read()
        total = time.monotonic() - started
    assert first.startswith(b"RIFF")
    assert first_at < total / 2
    assert first + rest == synth("wav", speech_seconds(SPEECH["input"]))


@pytest.mark.asyncio
async def test_speech_sse() -> None:
    async with FakeOpenAIEngine() as engine, aiohttp.ClientSession() as session:
        body = {**SPEECH, "model": "gpt-4o-mini-tts", "response_format": "pcm", "stream_format": "sse"}
        async with session.post(f"{engine.url}/audio/speech", json=body) as resp:
            assert resp.content_type == "text/event-stream"
            events = _events(await resp.read())
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert audio == synth("pcm", speech_seconds(SPEECH["input"]))
    usage = events[-1]["usage"]
    assert events[-1]["type"] == "speech.audio.done"
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


@pytest.mark.asyncio
async def test_transcription_formats_and_recording() -> None:
    async with FakeOpenAIEngine(transcript_text="Hello world. Bye now.") as engine, \
            aiohttp.ClientSession() as session:
        url = f"{engine.url}/audio/transcriptions"
        async with session.post(url, data=_form(model="whisper-1")) as resp:
            assert resp.content_type == "application/json"
            assert await resp.json() == {"text": "Hello world. Bye now."}
        async with session.post(url, data=_form(model="whisper-1", response_format="text")) as resp:
            assert (resp.content_type, await resp.text()) == ("text/plain", "Hello world. Bye now.")
        async with session.post(url, data=_form(model="whisper-1", response_format="srt")) as resp:
            assert await resp.text() == ("1\n00:00:00,000 --> 00:00:00,760\nHello world.\n\n"
                                         "2\n00:00:00,800 --> 00:00:01,560\nBye now.\n")
        async with session.post(url, data=_form(model="whisper-1", response_format="vtt")) as resp:
            assert (await resp.text()).startswith("WEBVTT\n\n00:00:00.000 --> 00:00:00.760\nHello world.\n")
        form = _form(model="whisper-1", response_format="verbose_json",
                     **{"timestamp_granularities[]": ["word", "segment"]})
        async with session.post(url, data=form) as resp:
            verbose = await resp.json()
    assert verbose["task"] == "transcribe" and verbose["language"] == "english"
    assert verbose["duration"] == pytest.approx(1.6)
    assert [s["text"] for s in verbose["segments"]] == [" Hello world.", " Bye now."]
    assert set(verbose["segments"][0]) == {"id", "seek", "start", "end", "text", "tokens", "temperature",
                                           "avg_logprob", "compression_ratio", "no_speech_prob"}
    assert [w["word"] for w in verbose["words"]] == ["Hello", "world.", "Bye", "now."]
    rec = engine.last
    assert rec.form == [("model", "whisper-1"), ("response_format", "verbose_json"),
                        ("timestamp_granularities[]", "word"), ("timestamp_granularities[]", "segment")]
    assert rec.files == [("file", "a.wav", "audio/wav", b"RIFF....WAVEfmt ")]
    assert rec.form_values("timestamp_granularities[]") == ["word", "segment"]
    assert len(engine.requests) == 5


@pytest.mark.asyncio
async def test_transcription_stream_and_translation() -> None:
    async with FakeOpenAIEngine() as engine, aiohttp.ClientSession() as session:
        form = _form(model="gpt-4o-transcribe", stream="true")
        async with session.post(f"{engine.url}/audio/transcriptions", data=form) as resp:
            assert resp.content_type == "text/event-stream"
            events = _events(await resp.read())
        form = _form(model="whisper-1", response_format="verbose_json")
        async with session.post(f"{engine.url}/audio/translations", data=form) as resp:
            verbose = await resp.json()
    assert "".join(e["delta"] for e in events[:-1]) == engine.transcript_text
    assert events[-1]["type"] == "transcript.text.done" and events[-1]["text"] == engine.transcript_text
    assert verbose["task"] == "translate" and "words" not in verbose


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("mode", "status", "code", "param"),
    [("500", 500, None, None), ("401", 401, "invalid_api_key", None),
     ("429", 429, "rate_limit_exceeded", None), ("400", 400, None, "input")],
)
async def test_error_modes(mode: str, status: int, code: str | None, param: str | None) -> None:
    async with FakeOpenAIEngine() as engine, aiohttp.ClientSession() as session:
        engine.mode = mode
        async with session.post(f"{engine.url}/audio/speech", json=SPEECH) as resp:
            assert resp.status == status
            error = (await resp.json())["error"]
            assert resp.headers.get("Retry-After") == ("7" if mode == "429" else None)
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param)


@pytest.mark.asyncio
async def test_expected_api_key_and_models() -> None:
    async with FakeOpenAIEngine(expected_api_key="sk-good") as engine, aiohttp.ClientSession() as session:
        async with session.get(f"{engine.url}/models") as resp:
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] is None
        async with session.get(f"{engine.url}/models", headers={"Authorization": "Bearer bad"}) as resp:
            assert (await resp.json())["error"]["code"] == "invalid_api_key"
        async with session.get(f"{engine.url}/models", headers={"Authorization": "Bearer sk-good"}) as resp:
            listing = await resp.json()
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["tts-1", "whisper-1"]


@pytest.mark.asyncio
async def test_garbage_mode() -> None:
    async with FakeOpenAIEngine() as engine, aiohttp.ClientSession() as session:
        with pytest.raises(ValueError):
            engine.mode = "5OO"
        engine.mode = "garbage"
        async with session.post(f"{engine.url}/audio/speech", json=SPEECH) as resp:
            assert (resp.status, resp.content_type) == (200, "text/html")
        async with session.post(f"{engine.url}/audio/transcriptions", data=_form(model="whisper-1")) as resp:
            assert (resp.status, resp.content_type) == (200, "application/json")
            with pytest.raises(ValueError):
                json.loads(await resp.read())


@pytest.mark.asyncio
async def test_drop_midstream() -> None:
    async with FakeOpenAIEngine(chunk_size=1024) as engine, aiohttp.ClientSession() as session:
        engine.mode = "drop_midstream"
        received = b""
        body = {**SPEECH, "response_format": "wav"}
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.post(f"{engine.url}/audio/speech", json=body) as r:
                assert r.status == 200
                async for chunk in r.content.iter_any():
                    received += chunk
    assert received.startswith(b"RIFF") and len(received) == 2 * 1024


@pytest.mark.asyncio
async def test_hang_is_cancelled_when_the_client_leaves() -> None:
    async with FakeOpenAIEngine() as engine, aiohttp.ClientSession() as session:
        engine.mode = "hang"
        with pytest.raises(asyncio.TimeoutError):
            async with session.post(f"{engine.url}/audio/speech", json=SPEECH,
                                    timeout=aiohttp.ClientTimeout(total=0.2)):
                pass
        for _ in range(50):
            if engine.cancelled:
                break
            await asyncio.sleep(0.02)
        assert (engine.cancelled, engine.active) == (1, 0)
