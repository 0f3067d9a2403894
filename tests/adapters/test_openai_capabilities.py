"""`openai` backends that speak part of OpenAI's audio API, each declared in `backends.<b>.capabilities`, behind
the gateway: doubles in the style of each server (no SSE, SSE for pcm/wav only, raw audio to an SSE request,
json-only transcripts with a `model_name` field, a server with two speech formats), driven with the official SDK
for every format and `stream_format`; what each server is asked; the declared limits; config errors by YAML path;
and a mixed load with no 5xx."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import srt
import webvtt

from gateway.__main__ import check_config
from tests.adapters.common import probe, serve
from tests.conftest import DEMO_KEY, LOOPBACK_TLS, Gateway, ServerThread, sdk, server_yaml
from tests.fakes.openai_engine import FakeOpenAIEngine, synth
from tests.support import expect_error

AUDIO = synth("wav", 5.0)
"""Longer than the double's words (3.56 s), so cues timed by its segments end before the audio does."""
TEXT = "The quick brown fox jumps over the lazy dog."
CONTAINERS = {"mp3": "mp3", "opus": "ogg", "aac": "aac", "flac": "flac", "wav": "wav"}
SPEECH_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")

PROFILES: dict[str, tuple[dict[str, Any], str]] = {
    # name: (the double's switches, the backend's YAML)
    "openai": ({}, ""),
    "kokoro": ({"sse_formats": ()}, "capabilities: {speech_sse: false}"),
    "vllm": ({"sse_formats": ("pcm", "wav")}, "capabilities: {speech_sse: [pcm, wav]}"),
    "undeclared": ({"sse_formats": ()}, ""),  # claims SSE by default, answers raw audio: framed, not a 502
    "two_formats": ({"speech_formats": ("mp3", "wav"), "sse_formats": ()},
                    "capabilities: {speech_formats: [mp3, wav], speech_sse: false}"),
    "two_formats_sse": ({"speech_formats": ("mp3", "wav"), "sse_formats": ("wav",)},  # flac SSE: wav, transcoded
                        "capabilities: {speech_formats: [mp3, wav], speech_sse: [wav]}"),
    "fws": ({"transcript_formats": ("json", "verbose_json"), "model_field": "model_name", "ignores_stream": True},
            """\
            capabilities:
              transcript_formats: [json, verbose_json]
              timestamp_granularities: []
              transcript_stream: false
            fields: {model: model_name}"""),
    "json_only": ({"transcript_formats": ("json",)}, "capabilities: {transcript_formats: [json]}"),
}


def config(url: str, spool: Path, backend_yaml: str) -> str:
    return textwrap.dedent(server_yaml(spool) + f"""
        backends:
          server:
            kind: openai
            url: "{url}"
            timeout_s: 5
            connect_timeout_s: 1
        """) + textwrap.indent(textwrap.dedent(backend_yaml), " " * 4) + textwrap.dedent("""
        models:
          tts-1: {task: speech, routes: [{backend: server, model: kokoro}]}
          whisper-1: {task: transcription, routes: [{backend: server, model: small}]}
        voices:
          nova: {server: af_nova}
        """)


@pytest.fixture(params=sorted(PROFILES))
def profile(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def server(servers: ServerThread, profile: str) -> Iterator[FakeOpenAIEngine]:
    engine = FakeOpenAIEngine(transcript_text=TEXT)
    for name, value in PROFILES[profile][0].items():
        setattr(engine, name, value)
    yield from serve(servers, engine)


@pytest.fixture
def gateway(make_gateway: Callable[[str], Gateway], server: FakeOpenAIEngine, profile: str,
            tmp_path: Path) -> Gateway:
    return make_gateway(config(server.url, tmp_path / "spool", PROFILES[profile][1]))


def speech(c: openai.OpenAI, fmt: str, stream_format: str = "audio", text: str = "Hello there.") -> bytes:
    """The audio the client gets, unwrapped from the SSE events when it asked for them."""
    with c.audio.speech.with_streaming_response.create(model="tts-1", voice="nova", input=text,
                                                       response_format=fmt, stream_format=stream_format) as r:
        body = r.read()
        ctype = r.headers["content-type"]
    if stream_format == "audio":
        return body
    assert ctype.startswith("text/event-stream"), ctype
    events = [json.loads(line[6:]) for line in body.decode().splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done" and events[:-1], events[-1:]
    assert {e["type"] for e in events[:-1]} == {"speech.audio.delta"}
    return b"".join(base64.b64decode(e["audio"]) for e in events[:-1])


def assert_audio(fmt: str, audio: bytes) -> None:
    if fmt == "pcm":
        assert len(audio) > 24_000 and len(audio) % 2 == 0  # 24 kHz s16le: over half a second
        return
    container, _, _, seconds = probe(audio)
    assert container == CONTAINERS[fmt] and seconds > 0.4, (fmt, container, seconds)


# -- speech: every format and stream_format through every server ------------------------------------------

@pytest.mark.parametrize("stream_format", ["audio", "sse"])
def test_every_speech_format_through_each_server(client: openai.OpenAI, server: FakeOpenAIEngine, profile: str,
                                                 stream_format: str) -> None:
    for fmt in SPEECH_FORMATS:
        assert_audio(fmt, speech(client, fmt, stream_format))
    bodies = [r.json for r in server.requests if r.path.endswith("/speech")]
    asked = {b["response_format"] for b in bodies}
    assert asked <= set(server.speech_formats), asked  # never a format it lacks: the gateway transcodes
    sse_asked = {b["response_format"] for b in bodies if b.get("stream_format") == "sse"}
    # the others declare nothing: all (the default)
    declared_sse = {"kokoro": set(), "two_formats": set(), "two_formats_sse": {"wav"}, "vllm": {"pcm", "wav"}}
    expected = declared_sse.get(profile, set(SPEECH_FORMATS)) if stream_format == "sse" else set()
    assert sse_asked == expected & set(server.speech_formats)


@pytest.mark.parametrize("profile", ["two_formats"])
def test_a_server_without_a_format_gets_the_least_lossy_it_has(client: openai.OpenAI, server: FakeOpenAIEngine,
                                                              profile: str) -> None:
    assert_audio("flac", speech(client, "flac"))
    assert server.last.json["response_format"] == "wav"
    assert_audio("mp3", speech(client, "mp3"))
    assert server.last.json["response_format"] == "mp3"


# -- transcripts: every format, and stream=true --------------------------------------------------------------

def test_every_transcript_format_through_each_server(client: openai.OpenAI, server: FakeOpenAIEngine,
                                                     profile: str) -> None:
    def ask(fmt: str, **kw: Any) -> Any:
        return client.audio.transcriptions.create(model="whisper-1", file=("a.wav", AUDIO, "audio/wav"),
                                                  response_format=fmt, **kw)

    assert ask("json").text == TEXT
    assert ask("text").strip() == TEXT
    verbose = ask("verbose_json", timestamp_granularities=["segment"])
    assert verbose.text == TEXT and verbose.duration > 0
    cues = list(srt.parse(ask("srt")))
    assert " ".join(c.content.replace("\n", " ") for c in cues) == TEXT
    vtt = webvtt.from_buffer(io.StringIO(ask("vtt")))
    assert " ".join(c.text.replace("\n", " ") for c in vtt) == TEXT
    events = list(ask("json", stream=True))
    assert events[-1].type == "transcript.text.done" and events[-1].text == TEXT
    forms = [r for r in server.requests if r.path.endswith("/transcriptions")]
    assert {r.form_value("response_format") for r in forms} <= set(server.transcript_formats)
    if profile == "fws":
        assert all(r.form_value("model_name") == "small" and r.form_value("model") is None for r in forms)
        assert not any(r.form_values("timestamp_granularities[]") or r.form_value("stream") for r in forms)
        if "verbose_json" in server.transcript_formats:  # rendered from verbose_json: its segments timed the cues
            assert len(cues) == 1 and cues[0].end.total_seconds() == pytest.approx(3.56)


@pytest.mark.parametrize("profile", ["fws", "json_only"])
def test_word_timestamps_and_diarization_a_server_cannot_give_are_refused(
        client: openai.OpenAI, server: FakeOpenAIEngine, profile: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", AUDIO, "audio/wav"),
                                           response_format="verbose_json", timestamp_granularities=["word"])
    expect_error(info.value, 400, "invalid_request_error", "unsupported_value", "timestamp_granularities[]")
    with pytest.raises(openai.BadRequestError) as info:  # a format the gateway cannot render from its JSON
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", AUDIO, "audio/wav"),
                                           response_format="diarized_json")
    expect_error(info.value, 400, "invalid_request_error", "unsupported_format", "response_format")
    assert not server.requests


# -- declared limits: languages, translation, max_input_chars ----------------------------------------------

@pytest.fixture
def english(servers: ServerThread) -> Iterator[FakeOpenAIEngine]:
    yield from serve(servers, FakeOpenAIEngine(transcript_text=TEXT))


def test_languages_translation_and_input_length_as_declared(english: FakeOpenAIEngine, tmp_path: Path,
                                                            make_gateway: Callable[[str], Gateway]) -> None:
    gw = make_gateway(config(english.url, tmp_path / "spool", """\
        capabilities: {languages: [en], translation: false, max_input_chars: 20}"""))
    with sdk(gw) as c:
        with pytest.raises(openai.BadRequestError) as info:
            c.audio.transcriptions.create(model="whisper-1", file=("a.wav", AUDIO, "audio/wav"), language="fr")
        expect_error(info.value, 400, "invalid_request_error", "unsupported_language", "language")
        assert c.audio.transcriptions.create(model="whisper-1", file=("a.wav", AUDIO, "audio/wav"),
                                             language="EN").text == TEXT
        # English-only, no translations endpoint: a translation is its transcription
        assert c.audio.translations.create(model="whisper-1", file=("a.wav", AUDIO, "audio/wav")).text == TEXT
        assert english.last.path == "/v1/audio/transcriptions"
        with pytest.raises(openai.BadRequestError) as info:
            c.audio.speech.create(model="tts-1", voice="nova", input="x" * 21)
        expect_error(info.value, 400, "invalid_request_error", "string_above_max_length", "input")
        assert len(c.audio.speech.create(model="tts-1", voice="nova", input="x" * 20).content) > 100
    assert not any(r.form_value("language") == "fr" for r in english.requests)


def test_a_server_that_does_not_transcribe(english: FakeOpenAIEngine, tmp_path: Path,
                                           make_gateway: Callable[[str], Gateway]) -> None:
    gw = make_gateway(config(english.url, tmp_path / "spool", "capabilities: {transcript_formats: []}"))
    with sdk(gw) as c:
        with pytest.raises(openai.BadRequestError) as info:
            c.audio.transcriptions.create(model="whisper-1", file=("a.wav", AUDIO, "audio/wav"))
        expect_error(info.value, 400, "invalid_request_error", "unsupported_task", "model")
        assert_audio("wav", c.audio.speech.create(model="tts-1", voice="nova", input="Speech only.",
                                                  response_format="wav").content)
    assert [r.path for r in english.requests] == ["/v1/audio/speech"]


def test_speech_fields_are_renamed(english: FakeOpenAIEngine, tmp_path: Path,
                                   make_gateway: Callable[[str], Gateway]) -> None:
    english.model_field = "model_name"
    gw = make_gateway(config(english.url, tmp_path / "spool", "fields: {model: model_name, voice: speaker}"))
    with sdk(gw) as c:
        assert_audio("mp3", c.audio.speech.create(model="tts-1", voice="nova", input="Renamed.").content)
    body = english.last.json
    assert body["model_name"] == "kokoro" and body["speaker"] == "af_nova" and "model" not in body


# -- config errors, by YAML path -----------------------------------------------------------------------------

@pytest.mark.parametrize(("yaml", "expected"), [
    ("capabilities: [mp3]", "backends.server.capabilities: expected a mapping"),
    ("capabilities: {speech_format: [mp3]}", "backends.server.capabilities.speech_format: unknown capability"),
    ("capabilities: {speech_formats: [mp4]}", "backends.server.capabilities.speech_formats[0]: unknown 'mp4'"),
    ("capabilities: {speech_formats: mp3}", "backends.server.capabilities.speech_formats: expected a list"),
    ("capabilities: {speech_formats: [mp3], speech_sse: [pcm]}",
     "backends.server.capabilities.speech_sse: pcm is not in speech_formats"),
    ("capabilities: {transcript_formats: [text, srt]}",
     "backends.server.capabilities.transcript_formats: needs json or verbose_json"),
    ("capabilities: {transcript_formats: [json], timestamp_granularities: [segment, word]}",
     "backends.server.capabilities.timestamp_granularities: word timings come in verbose_json"),
    ("capabilities: {timestamp_granularities: [words]}",
     "backends.server.capabilities.timestamp_granularities[0]: unknown 'words'"),
    ("capabilities: {translation: 'no'}", "backends.server.capabilities.translation: expected true or false"),
    ("capabilities: {languages: [en, 3]}", "backends.server.capabilities.languages[1]: expected a name"),
    ("capabilities: {max_input_chars: 0}", "backends.server.capabilities.max_input_chars: expected a whole number"),
    ("fields: [model]", "backends.server.fields: expected a mapping"),
    ("fields: {model: ''}", "backends.server.fields.model: expected a field name"),
    ("fields: {model: name, voice: name}", "backends.server.fields: two fields renamed to the same name"),
])
def test_config_errors_by_yaml_path(tmp_path: Path, capsys: pytest.CaptureFixture[str], yaml: str,
                                    expected: str) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(config("http://127.0.0.1:9/v1", tmp_path / "spool", yaml))
    assert check_config([str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: {expected}" in err, err
    assert "Traceback" not in err


def test_a_full_declaration_checks_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(config("http://127.0.0.1:9/v1", tmp_path / "spool", """\
        capabilities:
          speech_formats: [mp3, wav, pcm, opus, flac, aac]
          speech_sse: [pcm, wav]
          transcript_formats: [json, verbose_json]
          timestamp_granularities: [segment]
          translation: false
          languages: [en, fr]
          max_input_chars: 4096
        fields: {model: model_name}"""))
    assert check_config([str(path)]) == 0, capsys.readouterr().err


# -- mixed load ----------------------------------------------------------------------------------------------

def test_mixed_load_has_no_5xx(servers: ServerThread, make_gateway: Callable[[str], Gateway],
                               tmp_path: Path) -> None:
    """Three hundred requests at once in front of Kokoro- and faster-whisper-server-like doubles: SSE and raw
    speech in every format (half of them transcoded), every transcript format, streamed and not; every one a
    200 with a body."""
    kokoro, fws = FakeOpenAIEngine(transcript_text=TEXT), FakeOpenAIEngine(transcript_text=TEXT)
    kokoro.sse_formats, kokoro.speech_formats = (), ("mp3", "wav", "pcm")  # opus, aac, flac: transcoded
    fws.transcript_formats, fws.model_field, fws.ignores_stream = ("json", "verbose_json"), "model_name", True
    for engine in (kokoro, fws):
        servers.run(engine.start())
    try:
        gw = make_gateway(textwrap.dedent(server_yaml(tmp_path / "spool") + f"""
        backends:
          kokoro:
            kind: openai
            url: "{kokoro.url}"
            timeout_s: 20
            max_connections: 32
            capabilities: {{speech_formats: [mp3, wav, pcm], speech_sse: false}}
          fws:
            kind: openai
            url: "{fws.url}"
            timeout_s: 20
            max_connections: 32
            capabilities: {{transcript_formats: [json, verbose_json], timestamp_granularities: [],
                            transcript_stream: false}}
            fields: {{model: model_name}}
        models:
          tts-1: {{task: speech, routes: [{{backend: kokoro, model: kokoro}}]}}
          whisper-1: {{task: transcription, routes: [{{backend: fws, model: small}}]}}
        voices:
          nova: {{kokoro: af_nova}}
        """))
        statuses = servers.run(_load(gw, 300))
    finally:
        for engine in (kokoro, fws):
            servers.run(engine.stop())
    assert statuses == {200: 300}, statuses


async def _load(gw: Gateway, n: int) -> dict[int, int]:
    kinds: list[tuple[str, dict[str, Any]]] = []
    for fmt in SPEECH_FORMATS:
        kinds += [("speech", {"response_format": fmt}), ("speech", {"response_format": fmt, "stream_format": "sse"})]
    for fmt in ("json", "text", "srt", "vtt", "verbose_json"):
        kinds.append(("transcribe", {"response_format": fmt}))
    kinds.append(("transcribe", {"response_format": "json", "stream": True}))
    statuses: dict[int, int] = {}
    gate = asyncio.Semaphore(48)
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=DEMO_KEY, max_retries=0, timeout=60,
                                  http_client=openai.DefaultAsyncHttpxClient(verify=LOOPBACK_TLS)) as c:
        async def one(i: int) -> None:
            task, kw = kinds[i % len(kinds)]
            async with gate:
                if task == "speech":
                    call = c.audio.speech.with_raw_response.create(model="tts-1", voice="nova",
                                                                   input=f"Request {i}.", **kw)
                else:
                    call = c.audio.transcriptions.with_raw_response.create(
                        model="whisper-1", file=("a.wav", AUDIO, "audio/wav"), **kw)
                try:
                    response = await call
                    body = await response.http_response.aread()
                    status = response.status_code if body else -1  # an empty 200 counts as a failure
                except openai.APIStatusError as exc:
                    status = exc.status_code
            statuses[status] = statuses.get(status, 0) + 1

        await asyncio.gather(*(one(i) for i in range(n)))
    return statuses
