"""The engine failing: refused, erroring, garbage, hanging, rate limiting, dying mid-stream; failover;
what the SDK retries; and that nothing of the backend (address, key, traceback) reaches the client."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from gateway.errors import RateLimitError, ServiceUnavailableError
from tests.conftest import ENGINE_KEY, LOOPBACK_TLS, Gateway, ServerThread, engine_config, sdk
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.support import (
    HANG_TIMEOUT_S,
    WAV,
    assert_settled,
    expect_error,
    free_port,
    quick_timeouts,
    table_config,
)

pytestmark = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
ENGINE_SECRETS = (ENGINE_KEY, "sk-fa***ke", "req_fake_")


def speech(c: openai.OpenAI, **kw: Any) -> bytes:
    return c.audio.speech.create(**{"model": "tts-1", "voice": "nova", "input": "Hello there.",
                                    "response_format": "pcm", **kw}).content


def transcribe(c: openai.OpenAI, **kw: Any) -> Any:
    return c.audio.transcriptions.create(**{"model": "whisper-1", "file": ("a.wav", WAV, "audio/wav"), **kw})


def translate(c: openai.OpenAI, **kw: Any) -> Any:
    return c.audio.translations.create(**{"model": "whisper-1", "file": ("a.wav", WAV, "audio/wav"), **kw})


CALLS: dict[str, Callable[..., Any]] = {"speech": speech, "transcription": transcribe, "translation": translate}


@pytest.fixture
def dead_gateway(make_gateway: Callable[[str], Gateway], tmp_path: Path) -> Gateway:
    """The default table, pointing at a port nothing listens on."""
    return make_gateway(engine_config(f"http://127.0.0.1:{free_port()}/v1", tmp_path / "spool"))


@pytest.mark.parametrize("call", CALLS)
def test_refused_connection_is_502(servers: ServerThread, dead_gateway: Gateway, call: str) -> None:
    with sdk(dead_gateway.base_url) as c:
        with pytest.raises(openai.InternalServerError) as info:
            CALLS[call](c)
    error = expect_error(info.value, 502, "upstream_error", "bad_gateway")
    assert error["message"] == "Backend 'speaches' is unreachable."
    assert_settled(servers, dead_gateway)


@pytest.mark.parametrize("call", CALLS)
def test_engine_500_is_502(servers: ServerThread, client: openai.OpenAI, gateway: Gateway,
                           engine: FakeOpenAIEngine, call: str) -> None:
    engine.mode = "500"
    with pytest.raises(openai.InternalServerError) as info:
        CALLS[call](client)
    expect_error(info.value, 502, "upstream_error", "bad_gateway", secrets=ENGINE_SECRETS)
    assert len(engine.requests) == 1
    assert_settled(servers, gateway, engine)


@pytest.mark.parametrize(("call", "kw"), [
    ("speech", {}),
    ("speech", {"stream_format": "sse"}),
    ("transcription", {}),
    ("transcription", {"response_format": "verbose_json"}),
    ("transcription", {"response_format": "srt"}),
    ("translation", {"response_format": "text"}),
], ids=["speech-html", "speech-sse-html", "json-not-json", "verbose-not-json", "srt-html", "translation-html"])
def test_garbage_is_502(servers: ServerThread, client: openai.OpenAI, gateway: Gateway, engine: FakeOpenAIEngine,
                        call: str, kw: dict[str, Any]) -> None:
    engine.mode = "garbage"
    with pytest.raises(openai.InternalServerError) as info:
        CALLS[call](client, **kw)
    expect_error(info.value, 502, "upstream_error", "bad_gateway", secrets=("<html>", "502 Bad Gateway"))
    assert_settled(servers, gateway, engine)


@pytest.mark.parametrize("call", ["speech", "transcription"])
def test_hanging_engine_is_504_and_the_call_is_abandoned(servers: ServerThread, make_gateway: Callable[[str], Gateway],
                                                        engine: FakeOpenAIEngine, tmp_path: Path, call: str) -> None:
    gateway = make_gateway(quick_timeouts(engine_config(engine.url, tmp_path / "spool")))
    engine.mode = "hang"
    started = time.monotonic()
    with sdk(gateway) as client, pytest.raises(openai.APIStatusError) as info:
        CALLS[call](client)
    elapsed = time.monotonic() - started
    expect_error(info.value, 504, "upstream_error", "upstream_timeout")
    assert elapsed >= HANG_TIMEOUT_S  # it waited out the backend's timeout_s, then gave up
    assert_settled(servers, gateway, engine, timeout=1.0)  # the engine's handler was cancelled, not left hanging
    assert engine.cancelled == 1


@pytest.mark.parametrize("call", CALLS)
def test_engine_refusing_the_gateway_credential(servers: ServerThread, client: openai.OpenAI, gateway: Gateway,
                                                engine: FakeOpenAIEngine, call: str) -> None:
    engine.mode = "401"
    with pytest.raises(openai.InternalServerError) as info:
        CALLS[call](client)
    error = expect_error(info.value, 502, "upstream_error", "bad_gateway", secrets=ENGINE_SECRETS)
    assert "credential" in error["message"] and "refused" in error["message"]
    assert "invalid_api_key" not in info.value.response.text  # the client's own key is fine
    assert info.value.response.headers["x-should-retry"] == "false"  # no retry fixes a refused credential
    assert_settled(servers, gateway, engine)


def test_engine_checks_the_gateway_credential(gateway: Gateway, client: openai.OpenAI,
                                              engine: FakeOpenAIEngine) -> None:
    engine.expected_api_key = ENGINE_KEY
    assert len(speech(client)) > 100
    engine.expected_api_key = "something-else"
    with pytest.raises(openai.InternalServerError) as info:
        transcribe(client)
    expect_error(info.value, 502, "upstream_error", "bad_gateway", secrets=ENGINE_SECRETS)


@pytest.mark.parametrize("call", CALLS)
def test_engine_429_is_429_with_retry_after(servers: ServerThread, client: openai.OpenAI, gateway: Gateway,
                                            engine: FakeOpenAIEngine, call: str) -> None:
    engine.mode = "429"
    with pytest.raises(openai.RateLimitError) as info:
        CALLS[call](client)
    expect_error(info.value, 429, "requests", "rate_limit_exceeded", secrets=ENGINE_SECRETS)
    assert info.value.response.headers["Retry-After"] == "7"
    assert_settled(servers, gateway, engine)


@pytest.mark.parametrize(("call", "param"), [("speech", "input"), ("transcription", "file"), ("translation", "file")])
def test_engine_400_is_400_with_its_field(servers: ServerThread, client: openai.OpenAI, gateway: Gateway,
                                          engine: FakeOpenAIEngine, call: str, param: str) -> None:
    engine.mode = "400"
    with pytest.raises(openai.BadRequestError) as info:
        CALLS[call](client)
    error = expect_error(info.value, 400, "invalid_request_error", None, param, secrets=(ENGINE_KEY,))
    assert "fake engine mode 400" in error["message"]
    assert_settled(servers, gateway, engine)


def test_retry_after_on_429_and_503_errors() -> None:
    for err in (RateLimitError("slow down"), RateLimitError("x", retry_after=0), ServiceUnavailableError("draining")):
        response = err.response()
        assert response.status in (429, 503)
        assert int(response.headers["Retry-After"]) >= 1
        assert set(json.loads(response.body)["error"]) == {"message", "type", "param", "code"}  # type: ignore[arg-type]


def test_upstream_errors_carry_and_forward_the_request_id(client: openai.OpenAI, engine: FakeOpenAIEngine) -> None:
    engine.mode = "500"
    with pytest.raises(openai.InternalServerError) as info:
        speech(client, extra_headers={"X-Request-ID": "trace-500"})
    assert info.value.request_id == "trace-500"
    assert engine.last.headers["X-Request-ID"] == "trace-500"


# -- SDK retries -------------------------------------------------------------------------------------------


@pytest.fixture
def counted(gateway: Gateway) -> Iterator[tuple[openai.OpenAI, list[str]]]:
    """An SDK client with its default retry budget (2) that records every attempt it sends."""
    attempts: list[str] = []
    http = httpx2.Client(verify=LOOPBACK_TLS, event_hooks={"request": [lambda r: attempts.append(r.url.path)]})
    with sdk(gateway, max_retries=2, http_client=http) as c:
        yield c, attempts


@pytest.mark.parametrize(("status", "make"), [
    (400, lambda c: speech(c, input="")),
    (400, lambda c: transcribe(c, response_format="mp3")),
    (404, lambda c: speech(c, model="tts-404")),
    (413, lambda c: transcribe(c, file=("big.wav", b"\0" * 2_100_000, "audio/wav"))),
], ids=["400-speech", "400-transcription", "404", "413"])
def test_sdk_does_not_retry_client_errors(counted: tuple[openai.OpenAI, list[str]], engine: FakeOpenAIEngine,
                                          status: int, make: Callable[[openai.OpenAI], Any]) -> None:
    c, attempts = counted
    with pytest.raises(openai.APIStatusError) as info:
        make(c)
    assert info.value.status_code == status
    assert len(attempts) == 1
    assert engine.requests == []


def test_sdk_does_not_retry_a_bad_key(gateway: Gateway) -> None:
    attempts: list[str] = []
    http = httpx2.Client(verify=LOOPBACK_TLS, event_hooks={"request": [lambda r: attempts.append(r.url.path)]})
    with sdk(gateway, "sk-wrong", max_retries=2, http_client=http) as c:
        with pytest.raises(openai.AuthenticationError):
            speech(c)
    assert len(attempts) == 1


def test_sdk_does_not_retry_an_engine_400(counted: tuple[openai.OpenAI, list[str]], engine: FakeOpenAIEngine) -> None:
    c, attempts = counted
    engine.mode = "400"
    with pytest.raises(openai.BadRequestError):
        transcribe(c)
    assert len(attempts) == 1 and len(engine.requests) == 1


def test_sdk_retries_a_502(counted: tuple[openai.OpenAI, list[str]], engine: FakeOpenAIEngine) -> None:
    c, attempts = counted
    engine.mode = "500"
    with pytest.raises(openai.InternalServerError) as info:
        speech(c)
    assert info.value.status_code == 502
    assert len(attempts) == 3
    assert len(engine.requests) == 3
    assert len({r.headers["X-Request-ID"] for r in engine.requests}) == 3  # each attempt is its own request


def test_sdk_retry_recovers_when_the_engine_does(counted: tuple[openai.OpenAI, list[str]],
                                                 engine: FakeOpenAIEngine) -> None:
    c, attempts = counted
    engine.mode = "500"
    calls = {"n": 0}

    def flip(_: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            engine.mode = "ok"

    c._client.event_hooks["request"].append(flip)
    result = transcribe(c)
    assert result.text
    assert len(attempts) == 2
    assert engine.last.files[0][3] == WAV  # the re-sent upload is whole


# -- dying after the first byte ----------------------------------------------------------------------------


def test_engine_dying_mid_audio_stream_breaks_the_client_stream(servers: ServerThread, client: openai.OpenAI,
                                                                gateway: Gateway, engine: FakeOpenAIEngine) -> None:
    engine.mode, engine.chunk_size = "drop_midstream", 2048
    received = b""
    with pytest.raises((httpx2.RemoteProtocolError, httpx2.ReadError)):
        with client.audio.speech.with_streaming_response.create(
                model="tts-1", voice="nova", input="A sentence long enough to take several chunks.",
                response_format="pcm") as response:
            assert response.status_code == 200
            for chunk in response.iter_bytes():
                received += chunk
    assert len(received) >= 2048  # the first bytes did arrive before the cut
    assert_settled(servers, gateway, engine)


def test_engine_dying_mid_sse_stream_sends_an_error_event(servers: ServerThread, client: openai.OpenAI,
                                                          gateway: Gateway, engine: FakeOpenAIEngine) -> None:
    engine.mode, engine.chunk_size = "drop_midstream", 2048
    with client.audio.speech.with_streaming_response.create(
            model="tts-1", voice="nova", input="A sentence long enough to take several chunks.",
            response_format="pcm", stream_format="sse") as response:
        assert response.status_code == 200
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert events[0]["type"] == "speech.audio.delta"
    assert all(e.get("type") != "speech.audio.done" for e in events)
    final = events[-1]
    assert set(final) == {"error"}
    assert set(final["error"]) == {"message", "type", "param", "code"}
    assert final["error"]["type"] == "upstream_error"
    assert "127.0.0.1" not in json.dumps(final)
    assert_settled(servers, gateway, engine)


def test_engine_dying_mid_transcription_stream_raises_in_the_sdk(client: openai.OpenAI,
                                                                 engine: FakeOpenAIEngine) -> None:
    engine.mode = "drop_midstream"
    stream = transcribe(client, stream=True)
    seen: list[str] = []
    with pytest.raises(openai.APIError) as info:
        for event in stream:
            seen.append(event.type)
    assert seen and seen[0] == "transcript.text.delta"
    assert "transcript.text.done" not in seen
    assert info.value.type == "upstream_error"


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_engine_dying_mid_transcript_body_is_502(servers: ServerThread, client: openai.OpenAI, gateway: Gateway,
                                                 engine: FakeOpenAIEngine, fmt: str) -> None:
    """A buffered answer cut short is caught before anything is sent: a clean 502, not half a transcript."""
    engine.mode = "drop_midstream"
    with pytest.raises(openai.InternalServerError) as info:
        transcribe(client, response_format=fmt)
    expect_error(info.value, 502, "upstream_error", "bad_gateway")
    assert_settled(servers, gateway, engine)


# -- failover ----------------------------------------------------------------------------------------------


@pytest.fixture
def second_engine(servers: ServerThread) -> Iterator[FakeOpenAIEngine]:
    eng = FakeOpenAIEngine(transcript_text="Answered by the second engine.")
    servers.run(eng.start())
    yield eng
    servers.run(eng.stop())


def _failover_gateway(make_gateway: Callable[[str], Gateway], tmp_path: Path, first_url: str,
                      second_url: str) -> Gateway:
    return make_gateway(table_config(
        {"first": first_url, "second": second_url},
        {"tts-1": ("speech", [("first", "kokoro-a"), ("second", "kokoro-b")]),
         "whisper-1": ("transcription", [("first", "whisper-a"), ("second", "whisper-b")])},
        tmp_path / "spool", voices="""
        voices:
          nova: {first: af_nova_a, second: af_nova_b}
        """))


def test_failover_past_a_dead_backend(servers: ServerThread, make_gateway: Callable[[str], Gateway],
                                      tmp_path: Path, engine: FakeOpenAIEngine) -> None:
    gw = _failover_gateway(make_gateway, tmp_path, f"http://127.0.0.1:{free_port()}/v1", engine.url)
    with sdk(gw.base_url) as c:
        assert len(speech(c)) > 100
        assert engine.last.json["model"] == "kokoro-b"
        assert engine.last.json["voice"] == "af_nova_b"
        assert transcribe(c).text == engine.transcript_text
        assert engine.last.form_value("model") == "whisper-b"
        assert engine.last.files[0][3] == WAV
    assert len(engine.requests) == 2
    assert_settled(servers, gw, engine)


def test_failover_after_a_500_resends_the_whole_upload(servers: ServerThread, make_gateway: Callable[[str], Gateway],
                                                       tmp_path: Path, engine: FakeOpenAIEngine,
                                                       second_engine: FakeOpenAIEngine) -> None:
    engine.mode = "500"
    gw = _failover_gateway(make_gateway, tmp_path, engine.url, second_engine.url)
    data = WAV + bytes(range(256)) * 1000  # spooled to disk
    with sdk(gw.base_url) as c:
        result = transcribe(c, file=("long.wav", data, "audio/wav"), response_format="verbose_json")
        assert result.text == "Answered by the second engine."
        assert len(speech(c)) > 100
    assert [r.path for r in engine.requests] == ["/v1/audio/transcriptions", "/v1/audio/speech"]
    assert engine.requests[0].files[0][3] == data
    assert second_engine.requests[0].files[0][3] == data
    assert second_engine.requests[0].form_value("model") == "whisper-b"
    assert second_engine.requests[1].json["model"] == "kokoro-b"
    assert_settled(servers, gw, engine, second_engine)


def test_no_failover_on_a_client_error(make_gateway: Callable[[str], Gateway], tmp_path: Path,
                                       engine: FakeOpenAIEngine, second_engine: FakeOpenAIEngine) -> None:
    engine.mode = "400"
    gw = _failover_gateway(make_gateway, tmp_path, engine.url, second_engine.url)
    with sdk(gw.base_url) as c:
        with pytest.raises(openai.BadRequestError):
            speech(c)
        with pytest.raises(openai.BadRequestError):
            transcribe(c)
    assert second_engine.requests == []


def test_no_failover_after_the_first_byte(make_gateway: Callable[[str], Gateway], tmp_path: Path,
                                          engine: FakeOpenAIEngine, second_engine: FakeOpenAIEngine) -> None:
    engine.mode, engine.chunk_size = "drop_midstream", 2048
    gw = _failover_gateway(make_gateway, tmp_path, engine.url, second_engine.url)
    with sdk(gw.base_url) as c:
        with pytest.raises(openai.APIConnectionError):  # the SDK read a body that broke off
            speech(c, input="Long enough for a few chunks of audio, surely.")
    assert second_engine.requests == []


def test_all_routes_failing_is_one_502(make_gateway: Callable[[str], Gateway], tmp_path: Path,
                                       engine: FakeOpenAIEngine) -> None:
    engine.mode = "500"
    gw = _failover_gateway(make_gateway, tmp_path, f"http://127.0.0.1:{free_port()}/v1", engine.url)
    with sdk(gw.base_url) as c:
        with pytest.raises(openai.InternalServerError) as info:
            transcribe(c)
    error = expect_error(info.value, 502, "upstream_error", "bad_gateway")
    assert "second" in error["message"]  # the last route's failure is the one reported
