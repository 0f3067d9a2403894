"""The first-byte rule for every exception (gateway.streaming), and every engine stream closed on every path.

Failures nobody planned for are injected without touching the gateway's code: an extra route, mounted on
the real app behind the same middlewares (at PUT /v1/audio/speech, so metering and the ledger see the
speech endpoint), calls the real engine double through the real adapter, stacks the real stages
(gateway.streaming.Stages, the AudioMeter) and relays through gateway.streaming.relay; one stage of its
own fails. The wire is read over a raw socket, byte for byte.

Every test keeps each engine stream referenced (`kept`), so Python's finalizer of a dropped async
generator cannot release an upstream connection the gateway forgot to close: the leak checks
(`assert_settled`) see only what the gateway closed itself.
"""

from __future__ import annotations

import json
import logging
import socket
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web

from gateway.adapters import ADAPTERS
from gateway.adapters.base import SPEECH, AudioStream, SpeechJob
from gateway.app import build_app
from gateway.audio.meter import AudioMeter
from gateway.config import parse_config
from gateway.errors import Reason, UpstreamError
from gateway.handlers.routing import first_success
from gateway.state import AUDIO_WORKERS, IDENTITY, OUTCOME, REQUEST_ID, TABLE, TABLES
from gateway.streaming import Stages, first_chunk, relay
from gateway.table import Candidate
from tests.adapters.common import serve
from tests.conftest import DEMO_KEY, ENGINE_KEY, Gateway, ServerThread, sdk, serve_app, server_yaml
from tests.fakes.echo_engine import EchoEngine
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.metering_support import metered_config, scrape_settled, total, wait_ledger
from tests.raw_http import connect, read_chunked, read_head, read_response, request
from tests.support import assert_clean, assert_settled, check_error, wait_for

SECRET = "internal detail: http://10.1.2.3:8000/v1 with key engine-secret-abc"
SSE_EVENT = b'data: {"type":"speech.audio.delta","audio":"aGVsbG8="}\n\n'


async def broken_speech(request: web.Request) -> web.StreamResponse:
    """tts-1 from the real engine, with one stage that fails as `?fail=` says: `first` (before the first
    byte), `failover` (the first of two attempts fails before its first byte), `stage` (a RuntimeError after
    the first byte), `meter` (the AudioMeter itself, fed what no engine stream yields), or `handler` (the
    handler, once the whole answer went out)."""
    fail, sse = request.query["fail"], "sse" in request.query
    table, outcome = request[TABLE], request[OUTCOME]
    model = table.model("tts-1", request[IDENTITY], SPEECH)
    candidate = table.candidates(model, SPEECH)[0]
    outcome.route("tts-1", candidate.route.backend, candidate.route.model)
    outcome.input_chars = len("Hello.")
    attempts = 0

    async def attempt(candidate: Candidate) -> tuple[bytes, Stages]:
        nonlocal attempts
        attempts += 1
        audio = await candidate.adapter.synthesize(SpeechJob(
            request_id=request[REQUEST_ID], public_model="tts-1", model=candidate.route.model,
            voice=table.voice("nova", candidate.route.backend), input="Hello.", response_format="pcm"))
        stages = Stages(audio.chunks)
        if fail == "first" or (fail == "failover" and attempts == 1):
            stages.add(lambda chunks: explode_at_once(chunks, fail == "failover"))
        elif fail == "stage":
            stages.add(lambda chunks: explode_after_first(chunks, SSE_EVENT if sse else b"hello"))
        elif fail == "meter":
            stages.add(lambda chunks: then_not_bytes(chunks))
            stages.add(AudioMeter("wav", request.app[AUDIO_WORKERS]).tap)
        return await first_chunk(stages), stages

    first, rest = await first_success(request, [candidate, candidate], attempt, model)
    response = await relay(request, first, rest, "text/event-stream" if sse else "audio/pcm", sse=sse)
    if fail == "handler":
        raise RuntimeError(SECRET)
    return response


async def explode_at_once(chunks: AsyncIterator[bytes], upstream: bool) -> AsyncIterator[bytes]:
    await anext(aiter(chunks))
    raise UpstreamError("Backend 'speaches' failed.", reason=Reason.BAD_AUDIO) if upstream else RuntimeError(SECRET)
    yield b""  # an async generator that never yields


async def explode_after_first(chunks: AsyncIterator[bytes], first: bytes) -> AsyncIterator[bytes]:
    await anext(aiter(chunks))  # the engine stream has started: its connection is checked out
    yield first
    raise RuntimeError(SECRET)


async def then_not_bytes(chunks: AsyncIterator[bytes]) -> AsyncIterator[Any]:
    await anext(aiter(chunks))
    yield b"hello"
    yield "not bytes"  # the meter's spool refuses it: TypeError inside AudioMeter.tap


@pytest.fixture
def kept(monkeypatch: pytest.MonkeyPatch) -> Callable[[Gateway], list[AudioStream]]:
    """Keep every engine stream a gateway's adapters return alive until the test ends (see the docstring)."""
    streams: list[AudioStream] = []

    def keep(gateway: Gateway) -> list[AudioStream]:
        for adapter in gateway.app[TABLES].current.adapters.values():
            def spy(job: SpeechJob, synthesize: Any = adapter.synthesize) -> Any:
                async def call() -> AudioStream:
                    streams.append(await synthesize(job))
                    return streams[-1]
                return call()
            monkeypatch.setattr(adapter, "synthesize", spy)
        return streams

    return keep


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return tmp_path / "usage.jsonl"


@pytest.fixture
def broken(servers: ServerThread, engine: FakeOpenAIEngine, tmp_path: Path, ledger_path: Path,
           kept: Callable[[Gateway], list[AudioStream]]) -> Iterator[Gateway]:
    """The real app (metrics and ledger on) with the extra route."""
    (tmp_path / "spool").mkdir()
    config = parse_config(metered_config(engine.url, tmp_path / "spool", ledger_path=ledger_path),
                          kinds=ADAPTERS.keys())
    config = replace(config, server=replace(config.server, probe_interval_s=0.0))  # only the test's requests
    app = build_app(config)
    app.router.add_put("/v1/audio/speech", broken_speech)

    gateway = servers.run(serve_app(app, config, tmp_path / "spool"))
    kept(gateway)
    yield gateway
    servers.run(gateway.runner.cleanup())


def slow(engine: FakeOpenAIEngine) -> None:
    """The engine streams for about 6 s: longer than `assert_settled` waits, so only the gateway's own closing
    of its stream settles it."""
    engine.chunk_size, engine.chunk_delay = 1024, 0.25


def put(sock: socket.socket, query: str) -> None:
    sock.sendall(request("PUT", f"/v1/audio/speech?{query}", {"Authorization": f"Bearer {DEMO_KEY}"}, b"{}"))


def until_closed(sock: socket.socket, buf: bytearray) -> bytes:
    while chunk := sock.recv(65_536):
        buf += chunk
    return bytes(buf)


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info is not None]


def access_record(caplog: pytest.LogCaptureFixture, rid: str) -> dict[str, Any]:
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    return next(line for line in lines if line["request_id"] == rid)


def test_raw_audio_is_cut_after_an_unexpected_exception(servers: ServerThread, broken: Gateway,
                                                        engine: FakeOpenAIEngine, ledger_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    slow(engine)
    with connect(broken.port) as sock:
        put(sock, "fail=stage")
        buf = bytearray()
        status, headers = read_head(sock, buf)
        assert (status, headers["Transfer-Encoding"]) == (200, "chunked")
        wire = until_closed(sock, buf)
    assert wire == chunk(b"hello")  # no terminating 0-chunk, no second status line: a truncated body
    rid = headers["x-request-id"]
    [record] = tracebacks(caplog)  # logged once, with its traceback, by the gateway (not by aiohttp)
    assert record.name == "gateway.streaming" and rid in record.getMessage()
    assert isinstance(record.exc_info[1], RuntimeError)  # type: ignore[index]
    access = access_record(caplog, rid)
    assert (access["status"], access["bytes_out"], access["cut_after_first_byte"]) == (200, 5, "server_error")
    assert "error" not in access
    _, samples = scrape_settled(broken.url + "/metrics", 1)
    assert total(samples, "gateway_requests_total", endpoint="/v1/audio/speech", code="200") == 1
    assert total(samples, "gateway_requests_total", code="500") == 0
    assert total(samples, "gateway_response_bytes_total", endpoint="/v1/audio/speech") == 5
    assert total(samples, "gateway_billable_characters_total") == 0
    [ledger] = wait_ledger(ledger_path, 1)
    assert (ledger["request_id"], ledger["status"], ledger["billable"], ledger["completed"]) == (rid, 200, False,
                                                                                                 False)
    assert_settled(servers, broken, engine)


def test_sse_gets_an_error_event_then_a_proper_end(servers: ServerThread, broken: Gateway, engine: FakeOpenAIEngine,
                                                  ledger_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    slow(engine)
    with connect(broken.port) as sock:
        put(sock, "fail=stage&sse=1")
        buf = bytearray()
        status, headers = read_head(sock, buf)
        assert (status, headers["Content-Type"]) == (200, "text/event-stream")
        rid = headers["x-request-id"]
        error = {"error": {"message": "The server had an error while streaming the response. Please include the "
                                      f"request ID {rid} if you report it.", "type": "server_error", "param": None,
                           "code": None}}
        event = b"data: " + json.dumps(error, separators=(",", ":")).encode() + b"\n\n"
        expected = chunk(SSE_EVENT) + chunk(event) + b"0\r\n\r\n"
        while len(buf) < len(expected):
            buf += sock.recv(65_536)
        assert bytes(buf) == expected
        put(sock, "fail=meter")  # a proper end: the connection serves the next request
        buf = bytearray()
        assert read_head(sock, buf)[0] == 200
        assert until_closed(sock, buf) == chunk(b"hello")
    assert_clean(expected.decode(), (SECRET,))
    wait_for(lambda: len(tracebacks(caplog)) == 2, what="one traceback per request")
    assert access_record(caplog, rid)["cut_after_first_byte"] == "server_error"
    ledger = wait_ledger(ledger_path, 2)
    assert [(r["status"], r["billable"]) for r in ledger if r["request_id"] == rid] == [(200, False)]
    assert_settled(servers, broken, engine)


def test_an_exception_after_the_whole_answer_writes_nothing_more(servers: ServerThread, broken: Gateway,
                                                                 engine: FakeOpenAIEngine,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """error_middleware never writes a response after one was prepared (the middleware path, not relay's)."""
    caplog.set_level(logging.INFO)
    with connect(broken.port) as sock:
        for _ in range(2):  # the same keep-alive connection, twice: nothing stray was left on it
            put(sock, "fail=handler")
            buf = bytearray()
            status, headers = read_head(sock, buf)
            body = read_chunked(sock, buf)
            assert status == 200 and not buf
            assert len(body) == 24_000 and b"HTTP/1.1" not in body  # the engine's 0.5 s of pcm, whole
    wait_for(lambda: len(tracebacks(caplog)) == 2, what="one traceback per request")
    assert all(r.name == "gateway.streaming" and "sent whole" in r.getMessage() for r in tracebacks(caplog))
    access = access_record(caplog, headers["x-request-id"])
    assert access["status"] == 200 and "cut_after_first_byte" not in access and "error" not in access
    assert_settled(servers, broken, engine)


def test_a_meter_exception_cuts_the_stream_and_closes_the_engine_stream(servers: ServerThread, broken: Gateway,
                                                                       engine: FakeOpenAIEngine,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    slow(engine)
    with connect(broken.port) as sock:
        put(sock, "fail=meter")
        buf = bytearray()
        assert read_head(sock, buf)[0] == 200
        assert until_closed(sock, buf) == chunk(b"hello")
    [record] = tracebacks(caplog)
    assert isinstance(record.exc_info[1], TypeError)  # type: ignore[index]
    assert_settled(servers, broken, engine)


def test_a_failure_before_the_first_byte_is_a_clean_500_and_closes_the_engine_stream(
        servers: ServerThread, broken: Gateway, engine: FakeOpenAIEngine, caplog: pytest.LogCaptureFixture) -> None:
    slow(engine)
    with connect(broken.port) as sock:
        put(sock, "fail=first")
        response = read_response(sock)
    check_error(response.status, response.headers, response.body, expected_status=500, type_="server_error",
                code=None, secrets=(SECRET,))
    [record] = tracebacks(caplog)
    assert record.name == "gateway" and isinstance(record.exc_info[1], RuntimeError)  # type: ignore[index]
    assert_settled(servers, broken, engine)


def test_failover_closes_the_failed_attempts_stream(servers: ServerThread, broken: Gateway,
                                                   engine: FakeOpenAIEngine) -> None:
    with connect(broken.port) as sock:
        put(sock, "fail=failover")
        response = read_response(sock)
    assert response.status == 200 and len(response.body) == 24_000  # the second attempt's 0.5 s of pcm, whole
    assert len(engine.requests) == 2
    slow(engine)
    with connect(broken.port) as sock:  # now with the first attempt's engine stream still streaming
        put(sock, "fail=failover")
        buf = bytearray()
        assert read_head(sock, buf)[0] == 200
        while not buf:
            buf += sock.recv(65_536)
        sock.shutdown(socket.SHUT_RDWR)
    assert_settled(servers, broken, engine)


# -- the real speech endpoint: transcoder failures, failover, disconnects ------------------------------


@pytest.fixture
def echo(servers: ServerThread) -> Iterator[EchoEngine]:
    yield from serve(servers, EchoEngine())


@pytest.fixture
def routes(make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine, echo: EchoEngine,
           tmp_path: Path, kept: Callable[[Gateway], list[AudioStream]]) -> Gateway:
    """`tts-dg`: Deepgram at the echo double, which answers audio the transcoder cannot decode (the gateway
    transcodes Deepgram's audio to change speed); `tts-fo`: that route, then the fake OpenAI engine."""
    echo.status, echo.answer, echo.answer_type, echo.answer_repeat = 200, b"<html>502 Bad Gateway</html>\n" * 256, \
        "audio/mpeg", 60
    echo.chunk_delay = 0.1  # 6 s: longer than assert_settled waits
    gateway = make_gateway(textwrap.dedent(server_yaml(tmp_path / "spool") + f"""
        backends:
          dg: {{kind: deepgram, url: "{echo.url}", api_key: "{ENGINE_KEY}", timeout_s: 2, connect_timeout_s: 1}}
          speaches: {{kind: openai, url: "{engine.url}", api_key: "{ENGINE_KEY}", timeout_s: 2,
                     connect_timeout_s: 1}}
        models:
          tts-dg: {{task: speech, routes: [{{backend: dg, model: m}}]}}
          tts-fo: {{task: speech, routes: [{{backend: dg, model: m}}, {{backend: speaches, model: kokoro}}]}}
        voices:
          nova: {{dg: v, speaches: af_nova}}
        metrics: {{enabled: true}}
    """))
    kept(gateway)
    return gateway


def test_a_transcoder_failure_before_the_first_byte_closes_the_engine_stream(servers: ServerThread, routes: Gateway,
                                                                            echo: EchoEngine) -> None:
    with sdk(routes.base_url) as client, \
            pytest.raises(openai.APIStatusError) as info:
        client.audio.speech.create(model="tts-dg", voice="nova", input="Hello.", response_format="wav", speed=1.5)
    assert info.value.status_code == 502 and "could not decode" in info.value.message
    assert len(echo.requests) == 1
    assert_settled(servers, routes, echo)


def test_failover_after_a_failed_first_chunk_closes_the_first_stream(servers: ServerThread, routes: Gateway,
                                                                     echo: EchoEngine,
                                                                     engine: FakeOpenAIEngine) -> None:
    with sdk(routes.base_url) as client:
        audio = client.audio.speech.create(model="tts-fo", voice="nova", input="Hello.", response_format="wav",
                                           speed=1.5).content
    assert len(echo.requests) == 1 and len(engine.requests) == 1
    assert audio.startswith(b"RIFF") and len(audio) > 44  # the second route's wav
    assert_settled(servers, routes, echo, engine)


def test_a_client_leaving_mid_stream_closes_the_engine_stream(servers: ServerThread, gateway: Gateway,
                                                              engine: FakeOpenAIEngine,
                                                              kept: Callable[[Gateway], list[AudioStream]]) -> None:
    streams = kept(gateway)
    slow(engine)
    body = json.dumps({"model": "tts-1", "voice": "nova", "input": "Hello there, a long sentence.",
                       "response_format": "pcm"}).encode()
    with connect(gateway.port) as sock:
        sock.sendall(request("POST", "/v1/audio/speech", {"Authorization": f"Bearer {DEMO_KEY}",
                                                          "Content-Type": "application/json"}, body))
        buf = bytearray()
        assert read_head(sock, buf)[0] == 200
        while not buf:
            buf += sock.recv(65_536)
    assert_settled(servers, gateway, engine)
    assert len(streams) == 1
