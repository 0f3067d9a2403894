"""Hostile and odd input, table-driven: each row is (request, status, type, code, param), answered by the
gateway itself in OpenAI's four-key shape, never a 5xx, and never reaching a backend."""

from __future__ import annotations

import gzip
import json
from typing import Any

import httpx2
import openai
import pytest

from tests.conftest import DEMO_KEY, Gateway
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.raw_http import exchange
from tests.support import WAV, check_error, expect_error

IRE = "invalid_request_error"
OK = {"model": "tts-1", "voice": "nova", "input": "Hello."}
OK_JSON = json.dumps(OK).encode()


def _json(text: str) -> bytes:
    return text.encode()


def _raw(head: str, body: bytes) -> bytes:
    """A request exactly as written: `head` with LF line ends (made CRLF), then `body`."""
    return head.replace("\n", "\r\n").encode("latin-1") + b"\r\n\r\n" + body


def _speech(body: bytes, content_type: str = "application/json", extra: str = "") -> bytes:
    """POST /v1/audio/speech with the demo key, this body and content type, and `extra` header lines."""
    return _raw(f"POST /v1/audio/speech HTTP/1.1\nHost: gateway\nAuthorization: Bearer {DEMO_KEY}\nConnection: close"
                f"\nContent-Type: {content_type}\nContent-Length: {len(body)}{extra}", body)


# (id, content type, extra header lines, body, status, code, param)
JSON_CASES: list[tuple[str, str, str, bytes, int, str, str | None]] = [
    ("deep-nesting", "application/json", "", b"[" * 200_000, 400, "invalid_json", None),
    ("deep-object", "application/json", "", _json('{"a":' * 5000 + "1" + "}" * 5000), 400, "invalid_json", None),
    ("nested-extra", "application/json", "", _json(json.dumps({**OK, "x": [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]})),
     400, "invalid_json", None),
    ("nan-speed", "application/json", "", _json('{"model":"tts-1","voice":"nova","input":"a","speed":NaN}'),
     400, "invalid_json", None),
    ("infinity-speed", "application/json", "", _json('{"model":"tts-1","voice":"nova","input":"a","speed":Infinity}'),
     400, "invalid_json", None),
    ("minus-infinity", "application/json", "", _json('{"model":"tts-1","voice":"nova","input":"a","x":-Infinity}'),
     400, "invalid_json", None),
    ("overflowing-float", "application/json", "", _json('{"model":"tts-1","voice":"nova","input":"a","speed":1e999}'),
     400, "invalid_json", None),
    ("huge-integer", "application/json", "", _json('{"model":"tts-1","voice":"nova","input":"a","speed":' + "9" * 5000
                                                   + "}"), 400, "invalid_json", None),
    ("lone-surrogate-input", "application/json", "", _json('{"model":"tts-1","voice":"nova","input":"hi \\ud800"}'),
     400, "invalid_value", "input"),
    ("lone-surrogate-voice", "application/json", "", _json('{"model":"tts-1","voice":"\\udfff","input":"hi"}'),
     400, "invalid_value", "voice"),
    ("lone-surrogate-extra", "application/json", "",
     _json('{"model":"tts-1","voice":"nova","input":"hi","lang_code":["\\ud83d"]}'), 400, "invalid_value", "lang_code"),
    ("lone-surrogate-key", "application/json", "", _json('{"model":"tts-1","voice":"nova","input":"hi","\\udc00":1}'),
     400, "invalid_value", None),
    ("unknown-charset", "application/json; charset=klingon", "", OK_JSON, 400, "invalid_json", None),
    ("charset-mismatch", "application/json; charset=utf-16", "", OK_JSON, 400, "invalid_json", None),
    ("invalid-utf8", "application/json", "", b'{"model":"tts-1","voice":"nova","input":"\xff\xfe"}', 400,
     "invalid_json", None),
    ("gzip-claimed-not-gzip", "application/json", "\nContent-Encoding: gzip", OK_JSON, 400, None, None),
    ("deflate-claimed-not-deflate", "application/json", "\nContent-Encoding: deflate", OK_JSON, 400, None, None),
    ("br-claimed-not-br", "application/json", "\nContent-Encoding: br", OK_JSON, 400, None, None),
    ("nul-in-json", "application/json", "", b'{"model":"tts-1","voice":"nova","input":"a\x00b"}', 400,
     "invalid_json", None),
    ("speed-nan-string", "application/json", "", _json(json.dumps({**OK, "speed": "NaN"})), 400, "invalid_type",
     "speed"),
]


@pytest.mark.parametrize(("content_type", "extra", "body", "status", "code", "param"),
                         [c[1:] for c in JSON_CASES], ids=[c[0] for c in JSON_CASES])
def test_hostile_json(gateway: Gateway, engine: FakeOpenAIEngine, content_type: str, extra: str, body: bytes,
                      status: int, code: str | None, param: str | None) -> None:
    got = exchange(gateway.port, _speech(body, content_type, extra))
    check_error(got.status, got.headers, got.body, expected_status=status, type_=IRE, code=code, param=param)
    assert engine.requests == []


def test_gzip_json_body_is_accepted(gateway: Gateway, engine: FakeOpenAIEngine) -> None:
    """A body really in its Content-Encoding is decoded: the rows above fail for the mismatch, not the header."""
    body = gzip.compress(json.dumps({**OK, "response_format": "pcm"}).encode())
    got = exchange(gateway.port, _speech(body, extra="\nContent-Encoding: gzip"))
    assert got.status == 200, got.body
    assert engine.last.json["input"] == "Hello."


NUMBER_CASES: list[tuple[str, str, dict[str, Any], str]] = [
    ("temperature-nan", "transcriptions", {"temperature": "nan"}, "temperature"),
    ("temperature-inf", "transcriptions", {"temperature": "inf"}, "temperature"),
    ("temperature-minus-inf", "translations", {"temperature": "-Infinity"}, "temperature"),
    ("temperature-overflow", "transcriptions", {"temperature": "1e999"}, "temperature"),
]


@pytest.mark.parametrize(("endpoint", "fields", "param"), [c[1:] for c in NUMBER_CASES],
                         ids=[c[0] for c in NUMBER_CASES])
def test_non_finite_form_numbers(client: openai.OpenAI, engine: FakeOpenAIEngine, endpoint: str,
                                 fields: dict[str, str], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        getattr(client.audio, endpoint).create(model="whisper-1", file=("a.wav", WAV, "audio/wav"),
                                               extra_body=fields)
    expect_error(info.value, 400, IRE, "invalid_value", param, message="finite")
    assert engine.requests == []


# -- odd paths, methods and headers: the status OpenAI gives, in its shape ----------------------------------

# (id, method, path, status)
ODD_REQUESTS: list[tuple[str, str, str, int]] = [
    ("double-slash", "POST", "//v1/audio/speech", 404),
    ("trailing-slash", "POST", "/v1/audio/speech/", 404),
    ("dot-segments", "POST", "/v1/audio/../audio/speech", 404),
    ("encoded-slash", "POST", "/v1/audio%2Fspeech", 404),
    ("nul-in-path", "POST", "/v1/audio/speech%00", 404),
    ("bad-percent", "GET", "/v1/models%zz", 404),
    ("non-utf8-path", "GET", "/v1/mod%ffels", 404),
    ("query-garbage", "GET", "/v1/nothing?%ff=%00", 404),
    ("put-speech", "PUT", "/v1/audio/speech", 405),
    ("patch-models", "PATCH", "/v1/models", 405),
    ("delete-voices", "DELETE", "/v1/audio/voices", 405),
    ("head-transcriptions", "HEAD", "/v1/audio/transcriptions", 405),
    ("unknown-method", "BREW", "/v1/audio/speech", 400),  # refused by the HTTP parser: not a method
    ("root", "GET", "/", 404),
    ("long-path", "GET", "/v1/" + "a" * 4000, 404),
]


@pytest.mark.parametrize(("method", "path", "status"), [c[1:] for c in ODD_REQUESTS], ids=[c[0] for c in ODD_REQUESTS])
def test_odd_requests(gateway: Gateway, engine: FakeOpenAIEngine, method: str, path: str, status: int) -> None:
    got = exchange(gateway.port, _raw(f"{method} {path} HTTP/1.1\nHost: gateway\nAuthorization: Bearer {DEMO_KEY}"
                                      "\nConnection: close\nContent-Length: 0", b""))
    if method == "HEAD":
        assert got.status == status and got.headers.get("Content-Type", "").startswith("application/json")
        return
    check_error(got.status, got.headers, got.body, expected_status=status, type_=IRE, code=None)
    assert engine.requests == []


# (id, extra header lines, status): 400s here come from the HTTP parser, 200s are headers the gateway ignores
ODD_HEADERS: list[tuple[str, str, int]] = [
    ("content-length-and-chunked", "\nTransfer-Encoding: chunked", 400),
    ("control-bytes-in-value", "\nAccept: \x01\x02", 400),
    ("header-without-colon", "\nthis is not a header", 400),
    ("request-id-garbage", "\nX-Request-ID: " + "\u00e9" * 50, 200),
    ("x-api-key-beside-bearer", "\nX-API-Key: nope", 200),
    ("two-content-types", "\nContent-Type: text/plain", 400),
    ("unknown-expect", "\nExpect: 200-ok", 417),
]


@pytest.mark.parametrize(("extra", "status"), [c[1:] for c in ODD_HEADERS], ids=[c[0] for c in ODD_HEADERS])
def test_odd_headers(gateway: Gateway, engine: FakeOpenAIEngine, extra: str, status: int) -> None:
    body = json.dumps({**OK, "response_format": "pcm"}).encode()
    got = exchange(gateway.port, _speech(body, extra=extra))
    if status == 200:
        assert got.status == 200, got.body
        return
    check_error(got.status, got.headers, got.body, expected_status=status, type_=IRE, code=None)


def test_sdk_default_headers_with_odd_values(client: openai.OpenAI, engine: FakeOpenAIEngine) -> None:
    response = client.post("/audio/speech", body={**OK, "response_format": "pcm"}, cast_to=httpx2.Response,
                           options={"headers": {"OpenAI-Organization": "org- x;=\\\"", "X-Stainless-Lang": "x" * 4000}})
    assert response.status_code == 200
