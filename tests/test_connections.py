"""Slow and hostile clients on raw sockets: header, keep-alive and body-gap timeouts, the connection
cap, HTTP parse errors in OpenAI's shape, and `Expect: 100-continue` answered only after auth."""

from __future__ import annotations

import json
import logging
import resource
import selectors
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp.web_protocol import RequestHandler

from gateway.connections import GuardedServer
from tests.conftest import DEMO_KEY, Gateway, ServerThread, engine_config
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.raw_http import connect, exchange, read_response, request, seconds_until_closed
from tests.support import WAV, check_error

SPEECH = json.dumps({"model": "tts-1", "voice": "nova", "input": "Hello."}).encode()
AUTH = {"Authorization": f"Bearer {DEMO_KEY}"}


def limited(engine: FakeOpenAIEngine, spool_dir: Path, **server: object) -> str:
    """The default test table with these `server:` keys added."""
    keys = "".join(f"  {k}: {v}\n" for k, v in server.items())
    return engine_config(engine.url, spool_dir).replace("server:\n", "server:\n" + keys, 1)


@pytest.fixture
def slow_gateway(make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine, tmp_path: Path) -> Gateway:
    """Short header and body timeouts; a keep-alive timeout far longer, so it cannot close what they should."""
    return make_gateway(limited(engine, tmp_path / "spool", header_timeout_s=0.5, keepalive_timeout_s=30,
                                body_timeout_s=0.5, max_connections=2000))


def open_connections(servers: ServerThread, gateway: Gateway) -> int:
    server = gateway.runner.server
    assert isinstance(server, GuardedServer)
    return servers.call(lambda: server.open)


# -- header and keep-alive timeouts -------------------------------------------------------------------

@pytest.mark.parametrize("sent", [b"", b"GET /heal", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"],
                         ids=["nothing", "half-request-line", "headers-unfinished"])
def test_half_sent_head_is_closed_within_the_header_timeout(slow_gateway: Gateway, sent: bytes) -> None:
    with connect(slow_gateway.port) as sock:
        sock.sendall(sent)
        assert 0.3 < seconds_until_closed(sock, 5) < 3  # 0.5 s, with room for a loaded machine


def test_trickled_head_is_closed_at_the_header_timeout(slow_gateway: Gateway) -> None:
    """Slowloris: a byte every 0.1 s keeps the socket busy but the head never completes."""
    with connect(slow_gateway.port) as sock:
        start = time.monotonic()
        with pytest.raises(OSError):
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
                if time.monotonic() - start > 5:
                    break
            sock.settimeout(0.5)
            if not sock.recv(1):
                raise ConnectionError("closed")
        assert time.monotonic() - start < 3  # 0.5 s; the trickle alone would last 13 s


def test_idle_keepalive_outlives_the_header_timeout_then_closes(make_gateway: Callable[[str], Gateway],
                                                                engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    gateway = make_gateway(limited(engine, tmp_path / "spool", header_timeout_s=0.5, keepalive_timeout_s=2))
    with connect(gateway.port) as sock:
        sock.sendall(request("GET", "/healthz"))
        assert read_response(sock).status == 200
        time.sleep(1.0)  # twice the header timeout: idle between requests is the keep-alive's business
        sock.sendall(request("GET", "/healthz"))
        assert read_response(sock).status == 200
        assert 1.5 < seconds_until_closed(sock, 8) < 5


# -- body gap timeout ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path,headers,body", [
    ("/v1/audio/speech", {"Content-Type": "application/json"}, SPEECH),
    ("/v1/audio/transcriptions", {"Content-Type": "multipart/form-data; boundary=XyZ"},
     b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XyZ--\r\n"),
], ids=["speech-json", "multipart"])
def test_stalled_body_gets_408_and_is_closed(slow_gateway: Gateway, engine: FakeOpenAIEngine, path: str,
                                             headers: dict[str, str], body: bytes) -> None:
    with connect(slow_gateway.port) as sock:
        sock.sendall(request("POST", path, {**AUTH, **headers, "Content-Length": str(len(body))}, body[:20]))
        start = time.monotonic()
        response = read_response(sock)
        waited = time.monotonic() - start
        check_error(response.status, response.headers, response.body, expected_status=408,
                    type_="invalid_request_error", code="request_timeout")
        assert response.headers["Connection"].lower() == "close"
        assert 0.4 < waited < 3
        assert seconds_until_closed(sock, 1) < 1
    assert engine.requests == []


def test_slow_but_moving_body_is_not_cut(slow_gateway: Gateway, engine: FakeOpenAIEngine) -> None:
    """The body timeout is a gap between reads, not a cap on the upload: 2 s of 0.25 s gaps passes."""
    boundary = "XyZ"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode() + WAV + f"\r\n--{boundary}--\r\n".encode()
    with connect(slow_gateway.port) as sock:
        sock.sendall(request("POST", "/v1/audio/transcriptions",
                             {**AUTH, "Content-Type": f"multipart/form-data; boundary={boundary}",
                              "Content-Length": str(len(body))}))
        step = len(body) // 8 + 1
        for i in range(0, len(body), step):
            sock.sendall(body[i:i + step])
            time.sleep(0.25)
        response = read_response(sock)
    assert response.status == 200, response.body
    assert len(engine.requests) == 1


def test_a_thousand_stalled_connections_are_all_closed(servers: ServerThread, slow_gateway: Gateway) -> None:
    """Half send half a head, half a complete head and a stalled body; every one is closed in time."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2200:
        pytest.skip("needs about 2,200 file descriptors (client and server ends)")
    stalled_body = request("POST", "/v1/audio/speech",
                           {**AUTH, "Content-Type": "application/json", "Content-Length": "1000"}, b'{"mo')
    socks: list[socket.socket] = []
    try:
        for i in range(1000):
            sock = connect(slow_gateway.port)
            sock.sendall(b"POST /v1/audio/spe" if i % 2 else stalled_body)
            sock.setblocking(False)
            socks.append(sock)
        start = time.monotonic()
        selector = selectors.DefaultSelector()
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        open_ = set(socks)
        while open_ and time.monotonic() - start < 10:
            for key, _ in selector.select(timeout=0.5):
                sock = key.fileobj  # type: ignore[assignment]
                try:
                    data = sock.recv(65_536)
                except ConnectionResetError:
                    data = b""
                if not data:
                    selector.unregister(sock)
                    open_.discard(sock)
        elapsed = time.monotonic() - start
        assert not open_, f"{len(open_)} connections still open after {elapsed:.1f} s"
        assert elapsed < 8
        deadline = time.monotonic() + 3
        while open_connections(servers, slow_gateway) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert open_connections(servers, slow_gateway) == 0
    finally:
        for sock in socks:
            sock.close()


# -- connection cap -----------------------------------------------------------------------------------

def test_connections_past_the_cap_get_a_clear_503(servers: ServerThread, make_gateway: Callable[[str], Gateway],
                                                  engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    gateway = make_gateway(limited(engine, tmp_path / "spool", max_connections=3, header_timeout_s=30))
    held = [connect(gateway.port) for _ in range(3)]
    try:
        deadline = time.monotonic() + 3
        while open_connections(servers, gateway) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        with connect(gateway.port) as extra:
            extra.sendall(request("GET", "/healthz"))
            response = read_response(extra)
            check_error(response.status, response.headers, response.body, expected_status=503,
                        type_="server_error", code="too_many_connections")
            assert response.headers["Retry-After"] == "1"
            assert response.headers["Connection"].lower() == "close"
            assert seconds_until_closed(extra, 2) < 2
        held.pop().close()
        deadline = time.monotonic() + 3
        while open_connections(servers, gateway) > 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert exchange(gateway.port, request("GET", "/healthz")).status == 200
    finally:
        for sock in held:
            sock.close()


# -- HTTP parse errors --------------------------------------------------------------------------------

MARK = "Zq7MarkerXv"
"""Planted in each hostile header: it must not come back in the answer or reach any log line."""

PARSE_ERRORS = {
    "bad-request-line": (f"GARBAGE{MARK}\r\n\r\n".encode(), 400, None),
    "bad-method": (f"G@T /{MARK} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 400, None),
    "url-too-long": (f"GET /{MARK}{'a' * 9000} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 431,
                     None),
    "oversized-authorization": (f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-{MARK}"
                                f"{'k' * 9000}\r\n\r\n".encode(), 431, None),
    "too-many-headers": (b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                         + b"".join(f"X-{MARK}-{i}: y\r\n".encode() for i in range(200)) + b"\r\n", 431,
                         None),
    "control-bytes": (f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {MARK}\x01\x02\r\n\r\n"
                      .encode(), 400, None),
    "no-colon": (f"GET /healthz HTTP/1.1\r\nHost: x\r\n{MARK}NoColon\r\n\r\n".encode(), 400,
                 None),
    "bad-chunk-size": (f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                       f"{MARK}\r\nabc\r\n0\r\n\r\n".encode(), 400, None),
    "length-and-chunked": (b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, None),
}


@pytest.mark.parametrize("raw,status,code", PARSE_ERRORS.values(), ids=PARSE_ERRORS.keys())
def test_http_parse_errors_are_openai_errors_that_echo_nothing(
        gateway: Gateway, caplog: pytest.LogCaptureFixture, raw: bytes, status: int, code: str | None) -> None:
    with caplog.at_level(logging.DEBUG), connect(gateway.port) as sock:
        sock.sendall(raw)
        response = read_response(sock)
        assert seconds_until_closed(sock, 2) < 2
    check_error(response.status, response.headers, response.body, expected_status=status,
                type_="invalid_request_error", code=code, secrets=(MARK, "kkkk"))
    assert MARK not in caplog.text and "kkkk" not in caplog.text
    assert "Traceback" not in caplog.text
    assert len([r for r in caplog.records if r.name in ("gateway", "aiohttp.server")]) <= 1


def test_bad_chunk_inside_a_body_being_read_is_a_400(gateway: Gateway, engine: FakeOpenAIEngine,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp alone leaves the reader waiting for ever when the framing breaks mid-body."""
    with caplog.at_level(logging.DEBUG), connect(gateway.port) as sock:
        sock.sendall(request("POST", "/v1/audio/speech", {**AUTH, "Content-Type": "application/json",
                                                          "Transfer-Encoding": "chunked"}) + b"3\r\n{\"m\r\n")
        time.sleep(0.2)
        sock.sendall(f"{MARK}\r\nabc\r\n0\r\n\r\n".encode())
        response = read_response(sock)
        assert seconds_until_closed(sock, 2) < 2
    check_error(response.status, response.headers, response.body, expected_status=400,
                type_="invalid_request_error", code=None, secrets=(MARK,))
    assert MARK not in caplog.text
    assert engine.requests == []


@pytest.mark.parametrize("header", ["Authorization: Bearer sk-\xff\xfe-key", "X-API-Key: sk-\xc3\x28-key"])
def test_non_utf8_key_is_401_invalid_api_key(gateway: Gateway, engine: FakeOpenAIEngine,
                                             caplog: pytest.LogCaptureFixture, header: str) -> None:
    raw = (f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\n{header}\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(SPEECH)}\r\n\r\n").encode("latin-1") + SPEECH
    with caplog.at_level(logging.DEBUG):
        response = exchange(gateway.port, raw)
    check_error(response.status, response.headers, response.body, expected_status=401,
                type_="invalid_request_error", code="invalid_api_key", secrets=("-key",))
    assert "-key" not in caplog.text
    assert engine.requests == []


# -- Expect: 100-continue -----------------------------------------------------------------------------

def expect_head(path: str, headers: dict[str, str], length: int) -> bytes:
    return request("POST", path, {**headers, "Expect": "100-continue", "Content-Length": str(length)})


@pytest.mark.parametrize("path,headers,length,status,code", [
    ("/v1/audio/speech", {"Content-Type": "application/json"}, len(SPEECH), 401, None),
    ("/v1/audio/speech", {"Authorization": "Bearer sk-wrong", "Content-Type": "application/json"},
     len(SPEECH), 401, "invalid_api_key"),
    ("/v1/audio/transcriptions", {"Content-Type": "multipart/form-data; boundary=b"}, 1000, 401, None),
    ("/v1/audio/transcriptions", {**AUTH, "Content-Type": "multipart/form-data; boundary=b"}, 30_000_000,
     413, "request_too_large"),
    ("/v1/audio/speech", {**AUTH, "Content-Type": "application/json"}, 30_000_000, 413, "request_too_large"),
], ids=["speech-no-key", "speech-wrong-key", "upload-no-key", "upload-30MB", "speech-30MB"])
def test_expect_continue_gets_the_4xx_instead_of_100(gateway: Gateway, engine: FakeOpenAIEngine, path: str,
                                                     headers: dict[str, str], length: int, status: int,
                                                     code: str | None) -> None:
    with connect(gateway.port) as sock:
        sock.sendall(expect_head(path, headers, length))
        response = read_response(sock)
        assert response.interim == []
        check_error(response.status, response.headers, response.body, expected_status=status,
                    type_="invalid_request_error", code=code)
        assert response.headers["Connection"].lower() == "close"  # the body never came: no reuse
        assert seconds_until_closed(sock, 2) < 2
    assert engine.requests == []


@pytest.mark.parametrize("path,content_type,body", [
    ("/v1/audio/speech", "application/json", SPEECH),
    ("/v1/audio/transcriptions", "multipart/form-data; boundary=XyZ",
     b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
     b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n" + WAV + b"\r\n--XyZ--\r\n"),
], ids=["speech", "transcription"])
def test_expect_continue_then_a_normal_answer(gateway: Gateway, engine: FakeOpenAIEngine, path: str,
                                              content_type: str, body: bytes) -> None:
    with connect(gateway.port) as sock:
        sock.sendall(expect_head(path, {**AUTH, "Content-Type": content_type}, len(body)))
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            buf += sock.recv(1024)
        assert bytes(buf).startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), bytes(buf)
        sock.sendall(body)
        response = read_response(sock, buf)
    assert response.status == 200, response.body
    assert response.interim == [100]
    assert len(engine.requests) == 1


def test_unknown_expectation_is_417_after_auth(gateway: Gateway, engine: FakeOpenAIEngine) -> None:
    raw = request("POST", "/v1/audio/speech", {**AUTH, "Content-Type": "application/json", "Expect": "sing",
                                               "Content-Length": str(len(SPEECH))}, SPEECH)
    response = exchange(gateway.port, raw)
    check_error(response.status, response.headers, response.body, expected_status=417,
                type_="invalid_request_error", code=None)
    no_key = exchange(gateway.port, request("POST", "/v1/audio/speech", {"Expect": "sing"}, SPEECH))
    assert no_key.status == 401
    assert engine.requests == []


# -- the aiohttp internals gateway/connections.py relies on ---------------------------------------------

def test_aiohttp_internals(servers: ServerThread, gateway: Gateway) -> None:
    """An aiohttp upgrade that renames what GuardedServer/GuardedHandler read fails here by name."""
    for name in ("_request_count", "_waiter", "_messages", "_current_request"):
        assert name in RequestHandler.__slots__, name
    server = gateway.runner.server
    assert isinstance(server, GuardedServer)
    assert isinstance(server._kwargs, dict) and server._loop is servers.loop
    assert "keepalive_timeout" in server._kwargs
    assert isinstance(gateway.runner._kwargs, dict) and "handler_cancellation" in gateway.runner._kwargs
