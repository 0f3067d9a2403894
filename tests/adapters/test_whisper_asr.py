"""whisper-asr-webservice behind the gateway, driven with the official SDK against a double of `POST /asr`:
the exact request, every transcript format rendered from its JSON, translations, its own errors and a busy
engine's readiness.
The contract every HTTP engine keeps (refusals, rate limits, failures, hangs, drops, readiness) is
tests/adapters/test_http_contract.py."""

from __future__ import annotations

import asyncio
import io
import itertools
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
from openai.types.audio import Transcription, TranscriptionVerbose, Translation, TranslationVerbose

from gateway.adapters.whisper_asr import WhisperAsrAdapter, prompt_tail
from gateway.config import Backend
from gateway.errors import UpstreamError
from gateway.state import HEALTH
from gateway.transcript import bare
from tests.adapters.common import serve
from tests.conftest import DEMO_KEY, ENGINE_KEY, Gateway, ServerThread, sdk, sha, start_gateway
from tests.fakes.openai_engine import synth
from tests.fakes.whisper_asr_engine import TRANSCRIPT, TRANSLATION, FakeWhisperAsr
from tests.support import assert_settled, expect_error, free_port

AUDIO = synth("wav", 3.0)
"""A 3 s tone as WAV (24 kHz mono): the double lays its words out over the decoded duration."""
WORDS = TRANSCRIPT.split()


def config(url: str, spool: Path, backend_extra: str = "") -> str:
    return textwrap.dedent(f"""
        server: {{max_upload_bytes: 2000000, spool_memory_bytes: 65536, spool_dir: {spool}}}
        keys:
          - {{name: demo, tenant: acme, sha256: "{sha(DEMO_KEY)}"}}
        backends:
          whisper:
            kind: whisper_asr
            url: "{url}"
            timeout_s: 2
            connect_timeout_s: 1
        """) + textwrap.indent(textwrap.dedent(backend_extra), " " * 4) + textwrap.dedent("""
        models:
          whisper-1: {task: transcription, routes: [{backend: whisper, model: large-v3}]}
          tts-1: {task: speech, routes: [{backend: whisper, model: large-v3}]}
        """)


@pytest.fixture
def asr(servers: ServerThread) -> Iterator[FakeWhisperAsr]:
    yield from serve(servers, FakeWhisperAsr())


@pytest.fixture
def gateway(make_gateway: Callable[[str], Gateway], asr: FakeWhisperAsr, tmp_path: Path) -> Gateway:
    return make_gateway(config(asr.url, tmp_path / "spool"))


def transcribe(c: openai.OpenAI, **kw: Any) -> Any:
    return c.audio.transcriptions.create(**{"model": "whisper-1", "file": ("clip.wav", AUDIO, "audio/wav"), **kw})


def assert_no_client_key(asr: FakeWhisperAsr) -> None:
    for rec in asr.requests:
        assert DEMO_KEY not in json.dumps(dict(rec.headers)) + json.dumps(rec.query)
        assert "Authorization" not in rec.headers


# -- the request ---------------------------------------------------------------------------------------


def test_json_and_the_exact_request(client: openai.OpenAI, asr: FakeWhisperAsr) -> None:
    result = transcribe(client, language="fr", prompt="Noms : Zoë, Ødegaard, 東京.", temperature=0.3)
    assert isinstance(result, Transcription)
    assert result.text == TRANSCRIPT.strip()
    sent = asr.last
    assert (sent.method, sent.path) == ("POST", "/asr")
    assert sent.query == {"task": "transcribe", "language": "fr", "initial_prompt": "Noms : Zoë, Ødegaard, 東京.",
                          "output": "json", "encode": "true", "word_timestamps": "true"}
    assert sent.files == [("audio_file", "clip.wav", "audio/wav", AUDIO)]  # streamed from the spool, intact
    assert sent.form == []  # no model, no temperature: the server has neither
    assert sent.headers["Content-Type"].startswith("multipart/form-data")
    assert sent.headers["X-Request-ID"] == result._request_id  # type: ignore[attr-defined]
    assert_no_client_key(asr)


def test_upload_name_and_type_kept_and_no_options_when_absent(client: openai.OpenAI, asr: FakeWhisperAsr) -> None:
    mp3 = synth("mp3", 1.0)
    transcribe(client, file=("réunion du 1er.mp3", mp3, "audio/mpeg"))
    assert asr.last.files == [("audio_file", "réunion du 1er.mp3", "audio/mpeg", mp3)]
    assert asr.last.query == {"task": "transcribe", "output": "json", "encode": "true", "word_timestamps": "true"}


@pytest.mark.parametrize(("given", "sent"), [("pt-BR", "pt"), ("iw", "he"), ("jv", "jw"), ("EN", "en")])
def test_language_tags_become_whisper_codes(client: openai.OpenAI, asr: FakeWhisperAsr, given: str, sent: str) -> None:
    transcribe(client, language=given)
    assert asr.last.query["language"] == sent


def test_a_language_whisper_lacks_is_400_before_the_engine(client: openai.OpenAI, asr: FakeWhisperAsr) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        transcribe(client, language="xx")
    expect_error(info.value, 400, "invalid_request_error", "unsupported_language", "language")
    assert asr.requests == []


def test_a_long_prompt_keeps_its_end(client: openai.OpenAI, asr: FakeWhisperAsr) -> None:
    prompt = "début " + "é" * 4000 + " fin"  # 8 KB of UTF-8, 24 KB percent-encoded: past uvicorn's 16 KiB head
    transcribe(client, prompt=prompt)
    sent = asr.last.query["initial_prompt"]
    assert sent.endswith("é fin") and len(sent.encode()) <= 2048
    assert prompt_tail("short") == "short"


def test_api_key_is_sent_for_a_proxy(make_gateway: Callable[[str], Gateway], asr: FakeWhisperAsr,
                                     tmp_path: Path) -> None:
    gw = make_gateway(config(asr.url, tmp_path / "spool", f'api_key: "{ENGINE_KEY}"\n'))
    with sdk(gw.base_url) as c:
        transcribe(c)
    assert asr.last.headers["Authorization"] == f"Bearer {ENGINE_KEY}"


# -- every format, rendered from the engine's JSON ------------------------------------------------------


@pytest.mark.parametrize("style", ["object", "array", "openai_whisper"])
def test_verbose_json_with_words_and_segments(client: openai.OpenAI, asr: FakeWhisperAsr, style: str) -> None:
    asr.segment_style = style
    result = transcribe(client, response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert isinstance(result, TranscriptionVerbose)
    TranscriptionVerbose.model_validate(result.model_dump())
    assert result.text == TRANSCRIPT.strip()
    assert result.language == "french"  # the engine's detected code, in OpenAI's spelling
    assert result.duration == pytest.approx(3.0, abs=0.05)  # the gateway's own measurement of the upload
    assert result.words is not None and [w.word for w in result.words] == [bare(w) for w in WORDS]  # as OpenAI's
    expected = asr.result("transcribe", None, 3.0, True)
    assert [(w.start, w.end) for w in result.words] == [(w["start"], w["end"])
                                                        for s in expected["segments"] for w in s["words"]]
    assert result.segments is not None
    assert [(s.start, s.end, s.text.strip()) for s in result.segments] == [
        (s["start"], s["end"], s["text"].strip()) for s in expected["segments"]]
    assert result.segments[0].avg_logprob == pytest.approx(-0.21)
    assert result.usage is not None and result.usage.seconds == 3  # type: ignore[union-attr]


def test_verbose_json_defaults_to_segments(client: openai.OpenAI) -> None:
    result = transcribe(client, response_format="verbose_json")
    assert isinstance(result, TranscriptionVerbose)
    assert result.words is None and result.segments is not None and len(result.segments) == 2


@pytest.mark.parametrize("fmt", ["text", "srt", "vtt"])
def test_text_formats(client: openai.OpenAI, asr: FakeWhisperAsr, fmt: str) -> None:
    raw = client.audio.transcriptions.with_raw_response.create(model="whisper-1", file=("a.wav", AUDIO, "audio/wav"),
                                                               response_format=fmt)
    result = raw.parse()
    assert isinstance(result, str) and raw.headers["content-type"].startswith("text/plain")
    assert asr.last.query["output"] == "json"  # always JSON upstream; the gateway renders the format
    if fmt == "text":
        assert result.strip() == TRANSCRIPT.strip()
        return
    if fmt == "srt":
        cues = [(c.start.total_seconds(), c.end.total_seconds(), c.content) for c in srt.parse(result)]
    else:
        assert result.startswith("WEBVTT")
        cues = [(c.start_in_seconds + c.start_time.milliseconds / 1000, c.end_in_seconds + c.end_time.milliseconds
                 / 1000, c.text) for c in webvtt.from_buffer(io.StringIO(result))]
    assert " ".join(text.replace("\n", " ") for _, _, text in cues) == TRANSCRIPT.strip()
    assert cues[0][0] == 0.0 and cues[-1][1] <= 3.0
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(cues))


def test_stream_true_gets_events_from_the_transcript(client: openai.OpenAI) -> None:
    events = list(transcribe(client, stream=True))
    assert events[-1].type == "transcript.text.done" and events[-1].text == TRANSCRIPT.strip()
    deltas = [e.delta for e in events[:-1]]  # one per segment, adding up to the text (Whisper's lead with a space)
    assert len(deltas) == 2 and "".join(deltas) == events[-1].text


@pytest.mark.parametrize(("fmt", "kind"), [("json", Translation), ("verbose_json", TranslationVerbose),
                                           ("text", str), ("srt", str), ("vtt", str)])
def test_translations(client: openai.OpenAI, asr: FakeWhisperAsr, fmt: str, kind: type) -> None:
    result = client.audio.translations.create(model="whisper-1", file=("fr.wav", AUDIO, "audio/wav"),
                                              response_format=fmt, prompt="Renard.")  # type: ignore[call-overload]
    assert isinstance(result, kind)
    assert asr.last.query == {"task": "translate", "initial_prompt": "Renard.", "output": "json", "encode": "true",
                              "word_timestamps": "true"}
    text = result if isinstance(result, str) else result.text
    assert "quick brown fox" in text and "renard" not in text
    if isinstance(result, TranslationVerbose):
        assert result.language == "english" and result.segments
        assert " ".join(s.text.strip() for s in result.segments) == TRANSLATION.strip()
    assert_no_client_key(asr)


def test_speech_routed_here_is_the_cores_400(client: openai.OpenAI, asr: FakeWhisperAsr) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.speech.create(model="tts-1", voice="alloy", input="Hello.")
    expect_error(info.value, 400, "invalid_request_error", "unsupported_task", "model")
    assert asr.requests == []


# -- errors --------------------------------------------------------------------------------------------


def test_fastapi_422_for_language_is_400_naming_it(servers: ServerThread, client: openai.OpenAI,
                                                   gateway: Gateway, asr: FakeWhisperAsr) -> None:
    asr.languages.discard("yue")  # a server whose Whisper predates large-v3's Cantonese
    with pytest.raises(openai.BadRequestError) as info:
        transcribe(client, language="yue")
    error = expect_error(info.value, 400, "invalid_request_error", None, "language")
    assert error["message"].startswith("Backend 'whisper' rejected the request: language: Input should be 'af'")
    assert len(asr.asr_requests) == 1
    assert_settled(servers, gateway, asr)  # type: ignore[arg-type]


@pytest.mark.parametrize("body", [b'{"text": 3}', b'{"text": "a", "segments": [{"start": "x"}]}', b"[]",
                                  b'{"text": "a", "segments": [{"start": NaN, "end": 1, "text": "a"}]}'])
def test_malformed_json_is_502(body: bytes) -> None:
    adapter = WhisperAsrAdapter(Backend("whisper", "whisper_asr", "http://x:9000"), None)  # type: ignore[arg-type]
    with pytest.raises(UpstreamError) as info:
        adapter._transcript(body)
    assert info.value.status == 502 and info.value.reason == "bad_response"


def test_refused_connection_is_502(make_gateway: Callable[[str], Gateway], tmp_path: Path) -> None:
    gw = make_gateway(config(f"http://127.0.0.1:{free_port()}", tmp_path / "spool"))
    with sdk(gw.base_url) as c:
        with pytest.raises(openai.InternalServerError) as info:
            transcribe(c)
    expect_error(info.value, 502, "upstream_error", "bad_gateway")


# -- readiness and configuration -----------------------------------------------------------------------


async def _readyz(gateway: Gateway) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(gateway.url + "/readyz") as r:
        return r.status, await r.json()


def test_busy_engine_stays_ready(servers: ServerThread, client: openai.OpenAI, gateway: Gateway,
                                 asr: FakeWhisperAsr) -> None:
    """The real server answers nothing while it transcribes; the gateway knows it is busy, not down."""
    asr.delay, asr.blocks_while_busy = 1.5, True

    async def during() -> tuple[int, float, float]:
        await asyncio.sleep(0.4)
        started = time.monotonic()
        await gateway.app[HEALTH].probe()  # a background probe round, during the transcription
        status, body = await _readyz(gateway)
        assert body["backends"] == {"whisper": "up"}
        took = time.monotonic() - started
        async with aiohttp.ClientSession() as s, s.get(asr.url + "/openapi.json") as r:  # the engine itself
            assert r.status == 200
        return status, took, time.monotonic() - started

    future = asyncio.run_coroutine_threadsafe(during(), servers.loop)
    assert transcribe(client).text == TRANSCRIPT.strip()
    status, took, direct = future.result(5)
    assert status == 200 and took < 0.3
    assert direct > 0.8  # a probe of its own would have waited for the transcription (> connect_timeout_s 1 - 0.4)
    assert [r.path for r in asr.requests] == ["/asr", "/openapi.json"]


@pytest.mark.parametrize(("options", "problem"), [
    ({"vad_filter": "yes"}, r"backends\.whisper\.vad_filter: expected true or false"),
    ({"beam_size": 5}, r"backends\.whisper\.beam_size: unknown option"),
])
def test_bad_options_are_config_errors(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        WhisperAsrAdapter(Backend("whisper", "whisper_asr", "http://x:9000", options=options), None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"backends\.whisper\.url: required"):
        WhisperAsrAdapter(Backend("whisper", "whisper_asr"), None)  # type: ignore[arg-type]


def test_options_reach_the_query(make_gateway: Callable[[str], Gateway], asr: FakeWhisperAsr, tmp_path: Path) -> None:
    gw = make_gateway(config(asr.url, tmp_path / "spool", "word_timestamps: false\nvad_filter: true\n"))
    with sdk(gw.base_url) as c:
        result = transcribe(c, response_format="verbose_json")
        assert asr.last.query == {"task": "transcribe", "output": "json", "encode": "true", "vad_filter": "true"}
        assert result.segments and result.words is None
        with pytest.raises(openai.BadRequestError) as info:  # the engine is asked for no word timings: none to give
            transcribe(c, response_format="verbose_json", timestamp_granularities=["word"])
    expect_error(info.value, 400, "invalid_request_error", "unsupported_value", param="timestamp_granularities[]")
    assert len(asr.asr_requests) == 1


def test_shipped_example_fails_over_to_the_second_deployment(servers: ServerThread, asr: FakeWhisperAsr,
                                                            tmp_path: Path) -> None:
    text = (Path(__file__).parents[2] / "config" / "examples" / "whisper-asr.yaml").read_text()
    text = (text.replace("http://whisper-asr.internal:9000", f"http://127.0.0.1:{free_port()}")
            .replace("http://whisper-asr-small.internal:9000", asr.url)
            .replace("spool_dir: /tmp", f"spool_dir: {tmp_path}"))
    gw = servers.run(start_gateway(text, tmp_path))
    try:
        with sdk(gw.base_url, "change-me") as c:
            assert transcribe(c).text == TRANSCRIPT.strip()
        assert asr.last.query["word_timestamps"] == "true"
    finally:
        servers.run(gw.runner.cleanup())
