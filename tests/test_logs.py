"""Logs stay clean: whatever a client sends, no key, no raw header text and no traceback reaches a log line.

One gateway gets a battery of hostile requests (wrong and oversized keys, keys in odd places, header
bytes that are not text, broken bodies, a client that leaves mid-stream); every record any logger
wrote meanwhile, formatted with its traceback, is searched for what the client sent.
"""

from __future__ import annotations

import json
import logging
import socket

import pytest

from tests.conftest import BETA_KEY, DEMO_KEY, Gateway
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.raw_http import connect, exchange, read_head, request

SECRET = "sk-live-0123456789abcdefSECRET"
MARKER = "hdr-MARKER-4f2a"
SPEECH = json.dumps({"model": "tts-1", "voice": "nova", "input": "Hello.", "response_format": "pcm"}).encode()

HOSTILE: list[tuple[str, bytes]] = [
    ("wrong-bearer", request("POST", "/v1/audio/speech", {"Authorization": f"Bearer {SECRET}",
                                                          "Content-Type": "application/json"}, SPEECH)),
    ("wrong-x-api-key", request("GET", "/v1/models", {"X-API-Key": SECRET})),
    ("oversized-bearer", request("GET", "/v1/models", {"Authorization": f"Bearer {SECRET}" + "x" * 20_000})),
    ("key-with-control-bytes", request("GET", "/v1/models", {"Authorization": f"Bearer {SECRET}\x01"})),
    ("non-utf8-key", request("GET", "/v1/models", {"X-API-Key": SECRET + "\xff\xfe"})),
    ("basic-auth", request("GET", "/v1/models", {"Authorization": f"Basic {SECRET}"})),
    ("header-without-colon", request("GET", "/v1/models", {f"{MARKER} {SECRET}": ""}).replace(b": \r\n", b"\r\n")),
    ("folded-header", request("GET", "/v1/models", {"X-Note": f"{MARKER}\r\n {SECRET}"})),
    ("too-many-headers", request("GET", "/v1/models", {f"X-{i}": f"{MARKER}{SECRET}" for i in range(200)})),
    ("bad-request-line", f"GET /v1/models?{SECRET} HTTP/1.1 {MARKER}\r\nHost: g\r\n\r\n".encode()),
    ("bad-method", f"{MARKER}{SECRET} /v1/models HTTP/1.1\r\nHost: g\r\n\r\n".encode()),
    ("multipart-header-garbage", request(
        "POST", "/v1/audio/transcriptions", {"Authorization": f"Bearer {DEMO_KEY}",
                                             "Content-Type": "multipart/form-data; boundary=b"},
        f'--b\r\nContent-Disposition: form-data; name="{MARKER}\x01{SECRET}"\r\n\r\nx\r\n--b--\r\n'.encode())),
    ("disposition-garbage", request(
        "POST", "/v1/audio/transcriptions", {"Authorization": f"Bearer {DEMO_KEY}",
                                             "Content-Type": "multipart/form-data; boundary=b"},
        f"--b\r\nContent-Disposition: {MARKER};;{SECRET}=\"\r\n\r\nx\r\n--b--\r\n".encode())),
    ("json-echo", request("POST", "/v1/audio/speech", {"Authorization": f"Bearer {DEMO_KEY}",
                                                       "Content-Type": f"application/json; charset={MARKER}"}, SPEECH)),
]


def _everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return "\n".join(formatter.format(r) for r in caplog.records)


def test_hostile_requests_leave_no_key_or_header_text_in_the_log(gateway: Gateway, engine: FakeOpenAIEngine,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for name, raw in HOSTILE:
        response = exchange(gateway.port, raw)
        assert 400 <= response.status < 500, (name, response.status, response.body[:200])
        assert SECRET not in response.body.decode("latin-1") and MARKER not in response.body.decode("latin-1"), name
    ok = exchange(gateway.port, request("POST", "/v1/audio/speech", {
        "Authorization": f"Bearer {DEMO_KEY}", "Content-Type": "application/json", "Connection": "close"}, SPEECH))
    assert ok.status == 200
    logged = _everything_logged(caplog)
    assert "gateway.access" in logged  # the log was captured at all
    for needle in (SECRET, SECRET[:16], MARKER, DEMO_KEY, BETA_KEY, "Traceback"):
        assert needle not in logged, f"{needle!r} in the log:\n{logged}"


def test_a_client_leaving_mid_upload_logs_no_traceback(gateway: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    head = request("POST", "/v1/audio/transcriptions", {
        "Authorization": f"Bearer {DEMO_KEY}", "Content-Type": "multipart/form-data; boundary=b",
        "Content-Length": "100000"})
    with connect(gateway.port) as sock:
        sock.sendall(head + b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n')
        sock.sendall(b"\0" * 500)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset on close
    with connect(gateway.port) as sock:  # the gateway still serves, and has logged the first one by now
        sock.sendall(request("GET", "/healthz", {"Connection": "close"}))
        assert read_head(sock, bytearray())[0] == 200
    logged = _everything_logged(caplog)
    assert "Traceback" not in logged and "Error handling request" not in logged, logged
