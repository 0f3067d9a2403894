"""Hostile backends: nothing a backend echoes leaks, its Retry-After cannot hurt, its complaints mean what they say.

Every HTTP engine kind is pointed at one echoing double (tests/fakes/echo_engine.py) that fails each request
with the gateway's own credential, the URL it was called on, a foreign bearer token and an `sk-` key in its
body and headers. Through the SDK, none of it may reach the client (status line, headers, message) or the
gateway's log; the engine's words otherwise still arrive.
"""

from __future__ import annotations

import json
import logging
import math
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from gateway.adapters.engine_errors import MAX_RETRY_AFTER, retry_after
from gateway.adapters.redact import MAX_TEXT, redact
from gateway.config import Backend
from tests.adapters.common import serve
from tests.conftest import DEMO_KEY, ENGINE_KEY, Gateway, ServerThread, sdk, server_yaml
from tests.fakes.echo_engine import FOREIGN_BEARER, HEX_TOKEN, SK_KEY, EchoEngine
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.metering_support import wait_ledger
from tests.support import WAV, assert_settled, expect_error, table_config

KINDS = ("openai", "whisper_asr", "elevenlabs", "deepgram", "azure_speech")
SPEAKS = ("openai", "elevenlabs", "deepgram", "azure_speech")
CALLS = [(kind, "transcription") for kind in KINDS] + [(kind, "speech") for kind in SPEAKS]
# (engine status, body shape) -> (client status)
FAILURES = [(400, "openai", 400), (400, "openai_text", 400), (422, "fastapi_list", 400), (422, "fastapi_error", 400),
            (400, "fastapi_message", 400), (400, "fastapi_text", 400), (400, "elevenlabs", 400),
            (400, "deepgram", 400), (400, "azure", 400), (429, "azure", 429), (401, "openai", 502),
            (404, "fastapi_text", 502), (500, "plain", 502), (503, "deepgram", 502)]


def config(url: str, spool: Path) -> str:
    """One backend of every HTTP kind, all at `url`, each with its own public models `stt-<kind>`, `tts-<kind>`."""
    backends = "".join(f"""
          {kind}: {{kind: {kind}, url: "{url}{'/v1' if kind == 'openai' else ''}", api_key: "{ENGINE_KEY}",
                    timeout_s: 2, connect_timeout_s: 1}}""" for kind in KINDS)
    models = "".join(f"""
          stt-{kind}: {{task: transcription, routes: [{{backend: {kind}, model: m}}]}}""" for kind in KINDS)
    models += "".join(f"""
          tts-{kind}: {{task: speech, routes: [{{backend: {kind}, model: m}}]}}""" for kind in SPEAKS)
    voices = ", ".join(f"{kind}: v" for kind in SPEAKS)
    return textwrap.dedent(server_yaml(spool) + f"""
        backends:{backends}
        models:{models}
        voices:
          nova: {{{voices}}}
    """)


@pytest.fixture
def echo(servers: ServerThread) -> Iterator[EchoEngine]:
    yield from serve(servers, EchoEngine())


@pytest.fixture
def gateway(make_gateway: Callable[[str], Gateway], echo: EchoEngine, tmp_path: Path) -> Gateway:
    return make_gateway(config(echo.url, tmp_path / "spool"))


def call(client: openai.OpenAI, kind: str, task: str, response_format: str = "json") -> Any:
    if task == "speech":
        return client.audio.speech.create(model=f"tts-{kind}", voice="nova", input="Hello.", response_format="mp3")
    return client.audio.transcriptions.create(model=f"stt-{kind}", file=("a.wav", WAV, "audio/wav"),
                                              response_format=response_format)  # type: ignore[call-overload]


def secrets(echo: EchoEngine) -> tuple[str, ...]:
    """What the echo double sends that a client must never see."""
    host = f"127.0.0.1:{echo.port}"
    return (ENGINE_KEY, host, f"http://{host}", f":{echo.port}", FOREIGN_BEARER.split()[1], SK_KEY, HEX_TOKEN,
            "Bearer ", "\x00", "\x1b", DEMO_KEY)


@pytest.mark.parametrize(("status", "shape", "client_status"), FAILURES)
@pytest.mark.parametrize(("kind", "task"), CALLS)
def test_nothing_a_backend_echoes_reaches_the_client_or_the_log(
        servers: ServerThread, client: openai.OpenAI, gateway: Gateway, echo: EchoEngine,
        caplog: pytest.LogCaptureFixture, kind: str, task: str, status: int, shape: str, client_status: int) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway")
    echo.status, echo.shape, echo.retry_after = status, shape, "1"
    with pytest.raises(openai.APIStatusError) as info:
        call(client, kind, task)
    response = info.value.response
    assert response.status_code == client_status, response.text
    assert ENGINE_KEY in echo.echoed_last and f"127.0.0.1:{echo.port}" in echo.echoed_last  # the double did echo
    seen = response.text + json.dumps(dict(response.headers)) + caplog.text
    for secret in secrets(echo):
        assert secret not in seen, f"{secret!r} leaked: {seen}"
    if status in (400, 422, 401, 404):  # no retry can fix these: the SDK must not send them three more times
        assert response.headers["x-should-retry"] == "false"
    message = info.value.body["message"]  # type: ignore[index]
    if client_status == 400:  # the engine's words still arrive, minus what they must not say
        assert "refused. You sent" in message and "[redacted]" in message and len(message) < MAX_TEXT + 80
    assert_settled(servers, gateway, echo)


def test_redaction_table() -> None:
    backend = Backend("b", "deepgram", url="https://user:pw@speech.internal.example:8443/v1", api_key="K3y-Zeta!",
                      options={"listen_params": {"access_token": "tok-123456"}})
    cases = {
        "key K3y-Zeta! and k3y-zeta! and K3y-Zeta%21": "key [redacted] and [redacted] and [redacted]",
        "at speech.internal.example:8443 or SPEECH.INTERNAL.EXAMPLE": "at [redacted] or [redacted]",
        "token tok-123456 used": "token [redacted] used",
        "see https://elsewhere.example/x?key=abc for help": "see [redacted] for help",
        "Authorization: Basic dXNlcjpwYXNz": "Authorization: [redacted]",
        '{"x-api-key": "abc", "api_key": "def"}': '{"x-api-key": "[redacted]", "api_key": "[redacted]"}',
        "GET /v1?api-key=abc&lang=en": "GET /v1?api-key=[redacted]&lang=en",
        "from 10.1.2.3:9000 with sk-abcdef123456": "from [redacted] with [redacted]",
        "id 3f2a9c7d8e1b4a6f9c0d2e4f6a8b0c1d": "id [redacted]",
        "line\none\x00\u200b two\x1b[31m": "line one two[31m",
        "Input should be 'json', 'text' or 'srt'": "Input should be 'json', 'text' or 'srt'",
        "Missing key: text; token limit reached": "Missing key: text; token limit reached",
    }
    for text, expected in cases.items():
        assert redact(backend, text) == expected, text
    clipped = redact(backend, "word " * 200)
    assert len(clipped) == MAX_TEXT and clipped.endswith("…")
    assert redact(backend, None) == ""


@pytest.mark.parametrize("hostile", ["a-" * 5000, "tokenapi_key-" * 800, "a:" * 5000, "sk-" * 3000, "1." * 5000])
def test_redaction_is_linear_on_hostile_text(hostile: str) -> None:
    """Runs the redaction's patterns could each retry from every position (3 s for `a-a-a-…` once); it runs on
    the event loop, so it must stay in milliseconds (bound generous for a loaded machine)."""
    backend = Backend("b", "openai", url="http://10.0.0.1:8000/v1", api_key="k-123456")
    started = time.perf_counter()
    redact(backend, hostile)
    assert time.perf_counter() - started < 1.0


def test_fastapi_and_friends_shapes_all_give_the_engines_message(client: openai.OpenAI, echo: EchoEngine) -> None:
    """Each shape's message arrives; its field becomes `param` only when it is one of OpenAI's request fields."""
    echo.text = "Input should be 'json', 'text' or 'srt'"
    naming = {"openai", "fastapi_list", "fastapi_error"}
    for shape in ("openai", "openai_text", "fastapi_text", "fastapi_list", "fastapi_message", "fastapi_error",
                  "elevenlabs", "deepgram", "azure"):
        for param, expected in (("language", "language"), ("output", None), ("timestamp_granularities",
                                                                              "timestamp_granularities")):
            echo.status, echo.shape, echo.param = 422, shape, param
            with pytest.raises(openai.BadRequestError) as info:
                call(client, "openai", "transcription")
            error = expect_error(info.value, 400, "invalid_request_error", None,
                                 expected if shape in naming else None)
            assert error["message"] == f"Backend 'openai' rejected the request: {echo.text}", shape
            assert info.value.response.headers["x-should-retry"] == "false"


def test_whisper_asr_blaming_the_gateways_own_parameter_is_a_502_not_retried(client: openai.OpenAI,
                                                                             echo: EchoEngine) -> None:
    """whisper-asr's refinement: a parameter the client never sent is the gateway's problem, not the client's."""
    echo.status, echo.shape, echo.text = 422, "fastapi_list", "Input should be 'json'"
    for field, shown in (("output", "output"), (SK_KEY, "[redacted]")):
        echo.param = field
        with pytest.raises(openai.InternalServerError) as info:
            call(client, "whisper_asr", "transcription")
        error = expect_error(info.value, 502, "upstream_error", "bad_gateway", secrets=(SK_KEY,))
        assert error["message"] == f"Backend 'whisper_asr' rejected the gateway's '{shown}' parameter: {echo.text}"
        assert info.value.response.headers["x-should-retry"] == "false"


@pytest.mark.parametrize(("header", "expected"), [
    ("7", 7), ("2.5", 3), ("0", 1), ("-5", 1), ("inf", MAX_RETRY_AFTER), ("-inf", 1), ("nan", 1),
    ("1e400", MAX_RETRY_AFTER), ("99999999", MAX_RETRY_AFTER), ("soon", 1), ("", 1),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 1),
    ("Mon, 99 Foo 2026 99:99:99 GMT", 1), ("Fri, 31 Dec 9999 23:59:59 GMT", MAX_RETRY_AFTER),
])
def test_backend_retry_after_is_sane(client: openai.OpenAI, echo: EchoEngine, header: str, expected: int) -> None:
    echo.status, echo.shape, echo.retry_after = 429, "openai", header
    with pytest.raises(openai.RateLimitError) as info:
        call(client, "openai", "transcription")
    expect_error(info.value, 429, "requests", "rate_limit_exceeded")
    assert info.value.response.headers["Retry-After"] == str(expected)


def test_retry_after_dates_count_from_now() -> None:
    now = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)
    assert retry_after(format_datetime(now + timedelta(seconds=42), usegmt=True), now) == 42
    assert retry_after(format_datetime(now - timedelta(hours=1), usegmt=True), now) == 1
    assert retry_after("Mon, 30 Nov 2026 12:00:10 -0000", now) == 10
    assert retry_after(None) == 1


# -- failover on a backend's 429 ------------------------------------------------------------------------------


@pytest.fixture
def spare(servers: ServerThread) -> Iterator[FakeOpenAIEngine]:
    yield from serve(servers, FakeOpenAIEngine())


def two_routes(make_gateway: Callable[[str], Gateway], first: str, second: str, tmp_path: Path) -> Gateway:
    return make_gateway(table_config({"first": first, "second": second},
                                     {"whisper-1": ("transcription", [("first", "m1"), ("second", "m2")])},
                                     tmp_path / "spool"))


def test_a_backends_429_fails_over_to_the_next_route(make_gateway: Callable[[str], Gateway], echo: EchoEngine,
                                                     spare: FakeOpenAIEngine, tmp_path: Path) -> None:
    gw = two_routes(make_gateway, echo.url + "/v1", spare.url, tmp_path)
    echo.status, echo.retry_after = 429, "30"
    with sdk(gw.base_url) as c:
        result = c.audio.transcriptions.create(model="whisper-1", file=("a.wav", WAV, "audio/wav"))
    assert result.text == spare.transcript_text
    assert len(echo.requests) == 1 and spare.last.form_value("model") == "m2"


def test_the_last_routes_429_reaches_the_client_with_retry_after(make_gateway: Callable[[str], Gateway],
                                                                 echo: EchoEngine, spare: FakeOpenAIEngine,
                                                                 tmp_path: Path) -> None:
    gw = two_routes(make_gateway, spare.url, echo.url + "/v1", tmp_path)
    spare.mode, echo.status, echo.retry_after = "500", 429, "30"
    with sdk(gw.base_url) as c:
        with pytest.raises(openai.RateLimitError) as info:
            c.audio.transcriptions.create(model="whisper-1", file=("a.wav", WAV, "audio/wav"))
    expect_error(info.value, 429, "requests", "rate_limit_exceeded", secrets=(SK_KEY,))
    assert info.value.response.headers["Retry-After"] == "30"
    assert len(spare.requests) == 1 and len(echo.requests) == 1


@pytest.mark.parametrize("status", [400, 422, 413])
def test_the_clients_own_4xx_never_fails_over(make_gateway: Callable[[str], Gateway], echo: EchoEngine,
                                              spare: FakeOpenAIEngine, tmp_path: Path, status: int) -> None:
    gw = two_routes(make_gateway, echo.url + "/v1", spare.url, tmp_path)
    echo.status = status
    with sdk(gw.base_url) as c:
        with pytest.raises(openai.BadRequestError):
            c.audio.transcriptions.create(model="whisper-1", file=("a.wav", WAV, "audio/wav"))
    assert len(echo.requests) == 1 and spare.requests == []


# -- non-finite timings ---------------------------------------------------------------------------------------

NAN, INF = math.nan, math.inf
TRANSCRIPTS: dict[str, Any] = {
    "elevenlabs": {"language_code": "eng", "text": "Hello there world.", "audio_duration_secs": NAN,
                   "words": [{"text": "Hello", "start": NAN, "end": 0.5, "type": "word"},
                             {"text": "there", "start": 0.5, "end": INF, "type": "word"},
                             {"text": "world.", "start": 1.0, "end": 1.5, "type": "word"}]},
    "deepgram": {"metadata": {"duration": INF}, "results": {
        "channels": [{"alternatives": [{"transcript": "Hello there world.",
                                        "words": [{"word": "hello", "start": NAN, "end": 0.5},
                                                  {"word": "there", "start": 0.5, "end": 1.0},
                                                  {"word": "world", "start": 1.0, "end": -INF}]}]}],
        "utterances": [{"start": 0.0, "end": 1.5, "transcript": "Hello there world.", "words": []}]}},
    "azure_speech": {"durationMilliseconds": NAN, "combinedPhrases": [{"text": "Hello there world."}],
                     "phrases": [{"offsetMilliseconds": 0, "durationMilliseconds": 1500, "text": "Hello there world.",
                                  "words": [{"text": "Hello", "offsetMilliseconds": NAN, "durationMilliseconds": 500},
                                            {"text": "there", "offsetMilliseconds": 500, "durationMilliseconds": INF},
                                            {"text": "world", "offsetMilliseconds": 1e308,
                                             "durationMilliseconds": 1e308}]}]},
}
BROKEN_SEGMENTS: dict[str, Any] = {
    "deepgram": {"results": {"channels": [{"alternatives": [{"transcript": "Hi.", "words": []}]}],
                             "utterances": [{"start": NAN, "end": 1.0, "transcript": "Hi."}]}},
    "azure_speech": {"combinedPhrases": [{"text": "Hi."}],
                     "phrases": [{"offsetMilliseconds": INF, "durationMilliseconds": 10, "text": "Hi."}]},
}


def strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} in JSON: {text}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("kind", sorted(TRANSCRIPTS))
def test_non_finite_timings_still_give_valid_transcripts(client: openai.OpenAI, echo: EchoEngine, kind: str) -> None:
    echo.answer = json.dumps(TRANSCRIPTS[kind]).encode()  # Python writes NaN / Infinity, as careless servers do
    verbose = client.audio.transcriptions.with_raw_response.create(
        model=f"stt-{kind}", file=("a.wav", WAV, "audio/wav"), response_format="verbose_json",
        timestamp_granularities=["word", "segment"])
    body = strict_json(verbose.http_response.text)
    assert body["text"] == "Hello there world."
    assert all(math.isfinite(x) for w in body.get("words", []) for x in (w["start"], w["end"]))
    for fmt in ("srt", "vtt"):
        text = call(client, kind, "transcription", response_format=fmt)
        assert "-->" in text and "nan" not in text.lower(), text


@pytest.mark.parametrize("kind", sorted(BROKEN_SEGMENTS))
def test_non_finite_segment_timings_are_a_malformed_answer(client: openai.OpenAI, echo: EchoEngine,
                                                           kind: str) -> None:
    echo.answer = json.dumps(BROKEN_SEGMENTS[kind]).encode()
    with pytest.raises(openai.InternalServerError) as info:
        call(client, kind, "transcription", response_format="srt")
    expect_error(info.value, 502, "upstream_error", "bad_gateway", message="malformed transcript")


DEEP = b"[" * 100_000 + b"]" * 100_000
"""Valid JSON nested far past what Python's parser takes (RecursionError, not ValueError)."""


@pytest.mark.parametrize("kind", KINDS)
def test_json_nested_too_deep_is_garbage_not_a_500(client: openai.OpenAI, echo: EchoEngine, kind: str) -> None:
    echo.answer = DEEP
    with pytest.raises(openai.InternalServerError) as info:
        call(client, kind, "transcription", response_format="verbose_json")
    expect_error(info.value, 502, "upstream_error", "bad_gateway", message="malformed transcript")
    echo.answer, echo.text, echo.shape = None, DEEP.decode(), "plain"  # the error body nested as deep
    with pytest.raises(openai.BadRequestError) as info:
        call(client, kind, "transcription")
    assert info.value.response.status_code == 400


def test_an_openai_backends_nan_is_not_relayed_as_json(client: openai.OpenAI, echo: EchoEngine) -> None:
    echo.answer = b'{"text": "Hi.", "duration": NaN, "segments": []}'
    with pytest.raises(openai.InternalServerError) as info:
        call(client, "openai", "transcription", response_format="verbose_json")
    expect_error(info.value, 502, "upstream_error", "bad_gateway", message="malformed transcript")


def test_an_endless_transcript_stream_is_cut_with_an_error_event(servers: ServerThread, client: openai.OpenAI,
                                                                 gateway: Gateway, echo: EchoEngine) -> None:
    delta = b'data: {"type": "transcript.text.delta", "delta": "' + b"la " * 21_000 + b'"}\n\n'
    echo.answer, echo.answer_type, echo.answer_repeat = delta, "text/event-stream", 17 * 1024 * 1024 // len(delta) + 2
    with client.audio.transcriptions.with_streaming_response.create(
            model="stt-openai", file=("a.wav", WAV, "audio/wav"), stream=True) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert 15 * 1024 * 1024 < sum(len(line) for line in lines) <= 16 * 1024 * 1024  # relayed up to the cap
    # the cap falls inside an event: the cut piece is ended, and the error is an event of its own
    assert lines[-1].startswith('data: {"error"'), lines[-1][:80]
    error = json.loads(lines[-1].removeprefix("data: "))["error"]
    assert error["code"] == "bad_gateway" and "oversized" in error["message"]
    assert_settled(servers, gateway, echo)


@pytest.mark.parametrize("task", ["speech", "transcription"])
def test_error_events_inside_a_relayed_stream_are_redacted(client: openai.OpenAI, echo: EchoEngine,
                                                           task: str) -> None:
    """An OpenAI-compatible engine reports a failure mid-stream as an SSE `error` event: relayed, redacted."""
    leak = f"failed calling {echo.url}/v1 with Bearer {ENGINE_KEY} ({SK_KEY}, {FOREIGN_BEARER})"
    if task == "speech":
        first = b'data: {"type": "speech.audio.delta", "audio": "AAAA"}\r\n\r\n'
    else:
        first = b'data: {"type": "transcript.text.delta", "delta": "Hel"}\r\n\r\n'
    echo.answer_type = "text/event-stream"
    echo.answer = first + b"data: " + json.dumps({"error": {"message": leak, "type": "server_error"}}).encode()
    if task == "speech":
        response = client.post("/audio/speech", cast_to=httpx2.Response, body={
            "model": "tts-openai", "voice": "nova", "input": "Hello.", "stream_format": "sse"})
    else:
        response = client.post("/audio/transcriptions", cast_to=httpx2.Response,
                               body={"model": "stt-openai", "stream": "true"},
                               files={"file": ("a.wav", WAV, "audio/wav")},
                               options={"headers": {"Content-Type": "multipart/form-data"}})
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[0]["type"] in ("speech.audio.delta", "transcript.text.delta")
    message = events[1]["error"]["message"]
    assert message.startswith("failed calling") and "[redacted]" in message
    for secret in secrets(echo):
        assert secret not in response.text


@pytest.mark.parametrize("kind", ["deepgram", "elevenlabs"])
def test_an_engines_inflated_duration_is_never_billed(make_gateway: Callable[[str], Gateway], echo: EchoEngine,
                                                      tmp_path: Path, kind: str) -> None:
    """Transcription is billed by the gateway's own measure of the upload, whatever the engine claims."""
    ledger = tmp_path / "usage.jsonl"
    gateway = make_gateway(config(echo.url, tmp_path / "spool") + f"ledger: {{sink: file, path: {ledger}}}\n")
    answer = json.loads(json.dumps(TRANSCRIPTS[kind]).replace("NaN", "0").replace("Infinity", "1"))
    if kind == "deepgram":
        answer["metadata"]["duration"] = 99_999.0
    else:
        answer["audio_duration_secs"] = 99_999.0
    echo.answer = json.dumps(answer).encode()
    with sdk(gateway.base_url) as client:
        client.audio.transcriptions.create(model=f"stt-{kind}", file=("a.wav", WAV, "audio/wav"))
    [record] = wait_ledger(ledger, 1)
    assert record["billable"] and record["audio_seconds"] == pytest.approx(0.2, abs=1e-3), record
