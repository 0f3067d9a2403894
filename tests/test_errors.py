"""Bad requests: each answered by the gateway itself with OpenAI's exact error shape, status, param and code.

Tables are (request, status, type, code, param). Requests go through the SDK wherever it can express
them (its generic `post` for bodies the typed methods would refuse); malformed bodies go raw.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import httpx2
import openai
import pytest

from tests.conftest import DEMO_KEY, Gateway, ServerThread
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.support import SPOOL_PREFIX, WAV, assert_settled, check_error, expect_error

OK = {"model": "tts-1", "voice": "nova", "input": "Hello."}
LONG = "x" * 4097
IRE = "invalid_request_error"
LIMIT = 2_000_000  # conftest's server.max_upload_bytes
pytestmark = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")


def _without(key: str) -> dict[str, Any]:
    return {k: v for k, v in OK.items() if k != key}


SPEECH_CASES: list[tuple[str, Any, int, str, str | None, str | None]] = [
    ("empty-input", {**OK, "input": ""}, 400, IRE, "string_below_min_length", "input"),
    ("input-4097", {**OK, "input": LONG}, 400, IRE, "string_above_max_length", "input"),
    ("instructions-4097", {**OK, "instructions": LONG}, 400, IRE, "string_above_max_length", "instructions"),
    ("speed-0.1", {**OK, "speed": 0.1}, 400, IRE, "decimal_below_min_value", "speed"),
    ("speed-5", {**OK, "speed": 5}, 400, IRE, "decimal_above_max_value", "speed"),
    ("speed-string", {**OK, "speed": "fast"}, 400, IRE, "invalid_type", "speed"),
    ("speed-bool", {**OK, "speed": True}, 400, IRE, "invalid_type", "speed"),
    ("input-number", {**OK, "input": 42}, 400, IRE, "invalid_type", "input"),
    ("input-list", {**OK, "input": ["a", "b"]}, 400, IRE, "invalid_type", "input"),
    ("model-number", {**OK, "model": 1}, 400, IRE, "invalid_type", "model"),
    ("voice-number", {**OK, "voice": 7}, 400, IRE, "invalid_type", "voice"),
    ("voice-object-extra", {**OK, "voice": {"id": "nova", "x": 1}}, 400, IRE, "invalid_value", "voice"),
    ("instructions-number", {**OK, "instructions": 3}, 400, IRE, "invalid_type", "instructions"),
    ("format-ogg", {**OK, "response_format": "ogg"}, 400, IRE, "invalid_value", "response_format"),
    ("format-number", {**OK, "response_format": 3}, 400, IRE, "invalid_type", "response_format"),
    ("stream-format", {**OK, "stream_format": "websocket"}, 400, IRE, "invalid_value", "stream_format"),
    ("missing-model", _without("model"), 400, IRE, "missing_required_parameter", "model"),
    ("missing-voice", _without("voice"), 400, IRE, "missing_required_parameter", "voice"),
    ("missing-input", _without("input"), 400, IRE, "missing_required_parameter", "input"),
    ("body-array", [OK], 400, IRE, "invalid_type", None),
    ("unknown-model", {**OK, "model": "tts-42"}, 404, IRE, "model_not_found", "model"),
    ("transcription-model", {**OK, "model": "whisper-1"}, 400, IRE, "model_not_supported", "model"),
]


@pytest.mark.parametrize(("payload", "status", "type_", "code", "param"),
                         [c[1:] for c in SPEECH_CASES], ids=[c[0] for c in SPEECH_CASES])
def test_speech_bad_input(client: openai.OpenAI, engine: FakeOpenAIEngine, payload: Any, status: int,
                          type_: str, code: str, param: str | None) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.post("/audio/speech", body=payload, cast_to=httpx2.Response)
    expect_error(info.value, status, type_, code, param)
    assert engine.requests == []


def test_speech_messages_are_openai_wording(client: openai.OpenAI) -> None:
    cases = [
        ({**OK, "input": LONG}, "Invalid 'input': string too long. Expected a string with maximum length 4096, "
                                "but got a string with length 4097 instead."),
        (_without("voice"), "Missing required parameter: 'voice'."),
        ({**OK, "speed": "fast"}, "Invalid type for 'speed': expected a number, but got a string instead."),
        ({**OK, "response_format": "ogg"}, "Invalid value: 'ogg'. Supported values are: "),
    ]
    for payload, message in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.post("/audio/speech", body=payload, cast_to=httpx2.Response)
        assert info.value.body["message"].startswith(message), info.value.body  # type: ignore[index]


def test_speech_limits_are_inclusive(client: openai.OpenAI, engine: FakeOpenAIEngine) -> None:
    """The edges themselves are allowed: 4096 characters, speed 0.25 and 4."""
    for payload in ({**OK, "input": "a" * 4096, "response_format": "pcm"},
                    {**OK, "instructions": "b" * 4096, "response_format": "pcm"},
                    {**OK, "speed": 0.25, "response_format": "pcm"}, {**OK, "speed": 4, "response_format": "pcm"}):
        response = client.post("/audio/speech", body=payload, cast_to=httpx2.Response)
        assert response.status_code == 200
    assert [r.json.get("speed") for r in engine.requests] == [1.0, 1.0, 0.25, 4]


TRANSCRIPTION_CASES: list[tuple[str, str, dict[str, Any], int, str, str | None, str | None]] = [
    ("format-mp3", "transcriptions", {"response_format": "mp3"}, 400, IRE, "invalid_value", "response_format"),
    ("translation-format-mp3", "translations", {"response_format": "mp3"}, 400, IRE, "invalid_value",
     "response_format"),
    ("translation-diarized", "translations", {"response_format": "diarized_json"}, 400, IRE, "invalid_value",
     "response_format"),
    ("translation-language", "translations", {"extra_body": {"language": "en"}}, 400, IRE, "unknown_parameter",
     "language"),
    ("translation-granularities", "translations", {"extra_body": {"timestamp_granularities[]": "word"}}, 400, IRE,
     "unknown_parameter", "timestamp_granularities"),
    ("granularities-with-json", "transcriptions", {"timestamp_granularities": ["word"]}, 400, IRE,
     "invalid_value", "timestamp_granularities"),
    ("granularities-with-text", "transcriptions", {"response_format": "text", "timestamp_granularities": ["segment"]},
     400, IRE, "invalid_value", "timestamp_granularities"),
    ("granularity-sentence", "transcriptions",
     {"response_format": "verbose_json", "timestamp_granularities": ["sentence"]}, 400, IRE, "invalid_value",
     "timestamp_granularities"),
    ("temperature-1.5", "transcriptions", {"temperature": 1.5}, 400, IRE, "decimal_above_max_value", "temperature"),
    ("temperature-negative", "transcriptions", {"temperature": -0.1}, 400, IRE, "decimal_below_min_value",
     "temperature"),
    ("temperature-string", "transcriptions", {"extra_body": {"temperature": "hot"}}, 400, IRE, "invalid_type",
     "temperature"),
    ("translation-temperature", "translations", {"temperature": 2}, 400, IRE, "decimal_above_max_value",
     "temperature"),
    ("language-name", "transcriptions", {"language": "english!"}, 400, IRE, "invalid_language_format", "language"),
    ("include-bogus", "transcriptions", {"include": ["bogus"]}, 400, IRE, "invalid_value", "include"),
    ("stream-maybe", "transcriptions", {"extra_body": {"stream": "maybe"}}, 400, IRE, "invalid_type", "stream"),
    ("prompt-4097", "transcriptions", {"prompt": LONG}, 400, IRE, "string_above_max_length", "prompt"),
    ("empty-model", "transcriptions", {"model": ""}, 400, IRE, "missing_required_parameter", "model"),
    ("unknown-model", "transcriptions", {"model": "whisper-9"}, 404, IRE, "model_not_found", "model"),
    ("speech-model", "transcriptions", {"model": "tts-1"}, 400, IRE, "model_not_supported", "model"),
    ("translation-unknown-model", "translations", {"model": "whisper-9"}, 404, IRE, "model_not_found", "model"),
]


@pytest.mark.parametrize(("endpoint", "kwargs", "status", "type_", "code", "param"),
                         [c[1:] for c in TRANSCRIPTION_CASES], ids=[c[0] for c in TRANSCRIPTION_CASES])
def test_transcription_bad_input(client: openai.OpenAI, engine: FakeOpenAIEngine, endpoint: str,
                                 kwargs: dict[str, Any], status: int, type_: str, code: str,
                                 param: str | None) -> None:
    resource = getattr(client.audio, endpoint)
    with pytest.raises(openai.APIStatusError) as info:
        resource.create(**{"model": "whisper-1", "file": ("a.wav", WAV, "audio/wav"), **kwargs})
    expect_error(info.value, status, type_, code, param)
    assert engine.requests == []


def test_translation_rejection_message(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.translations.create(model="whisper-1", file=("a.wav", WAV, "audio/wav"),
                                         extra_body={"language": "de"})
    assert info.value.body["message"] == "Unrecognized request argument supplied: language"  # type: ignore[index]


def test_json_body_to_transcriptions(client: openai.OpenAI, engine: FakeOpenAIEngine) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.post("/audio/transcriptions", body={"model": "whisper-1", "file": "a.wav"}, cast_to=httpx2.Response)
    expect_error(info.value, 400, IRE, "invalid_content_type", None, message="multipart/form-data")
    assert engine.requests == []


def test_unknown_url_is_openai_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.post("/audio/speak", body=OK, cast_to=httpx2.Response)
    expect_error(info.value, 404, IRE, None, None, message="Invalid URL (POST /v1/audio/speak)")
    with pytest.raises(openai.NotFoundError) as info:
        client.get("/nothing/here", cast_to=httpx2.Response)
    expect_error(info.value, 404, IRE, None, None, message="Invalid URL (GET /v1/nothing/here)")


def test_wrong_method_is_openai_405(client: openai.OpenAI) -> None:
    for method, path in (("get", "/audio/speech"), ("delete", "/audio/transcriptions"), ("post", "/models")):
        with pytest.raises(openai.APIStatusError) as info:
            if method == "post":
                client.post(path, body={}, cast_to=httpx2.Response)
            else:
                getattr(client, method)(path, cast_to=httpx2.Response)
        expect_error(info.value, 405, IRE, None, None)
        allow = info.value.response.headers.get("Allow", "")
        assert allow, f"405 for {method.upper()} {path} without an Allow header"


def test_oversized_json_body(client: openai.OpenAI, engine: FakeOpenAIEngine) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.post("/audio/speech", body={**OK, "input": "x" * 1_100_000}, cast_to=httpx2.Response)
    expect_error(info.value, 413, IRE, "request_too_large", None)
    assert engine.requests == []


# -- raw bodies the SDK cannot produce ----------------------------------------------------------------


async def raw_request(gateway: Gateway, head: str, body: bytes) -> tuple[int, Mapping[str, str], bytes]:
    """Send exactly these bytes (head without the blank line) and read the whole response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n\r\n" + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head_bytes, _, payload = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    headers = {**headers, **{k.lower(): v for k, v in headers.items()}}
    if headers.get("transfer-encoding") == "chunked":
        payload = _dechunk(payload)
    return status, headers, payload


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2:]
    return out


def _head(path: str, content_type: str, length: int, extra: str = "") -> str:
    return (f"POST {path} HTTP/1.1\nHost: gateway\nAuthorization: Bearer {DEMO_KEY}\nConnection: close\n"
            f"Content-Type: {content_type}\nContent-Length: {length}{extra}")


def _multipart(boundary: str, *parts: tuple[str, str | None, bytes], close: bool = True) -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename:
            out += b"Content-Type: audio/wav\r\n"
        out += b"\r\n" + data + b"\r\n"
    return out + (f"--{boundary}--\r\n".encode() if close else b"")


MODEL_PART = ("model", None, b"whisper-1")
FILE_PART = ("file", "a.wav", WAV)

MALFORMED: list[tuple[str, str, bytes, str]] = [
    ("wrong-boundary", "multipart/form-data; boundary=abc123", _multipart("zzz999", MODEL_PART, FILE_PART),
     "invalid_multipart"),
    ("no-boundary-param", "multipart/form-data", _multipart("abc123", MODEL_PART, FILE_PART), "invalid_multipart"),
    ("truncated-file-part", "multipart/form-data; boundary=abc123",
     _multipart("abc123", MODEL_PART, FILE_PART, close=False)[:-300], "invalid_multipart"),
    ("no-closing-boundary", "multipart/form-data; boundary=abc123",
     _multipart("abc123", MODEL_PART, FILE_PART, close=False), "invalid_multipart"),
    ("empty-body", "multipart/form-data; boundary=abc123", b"", "invalid_multipart"),
    ("garbage-body", "multipart/form-data; boundary=abc123", b"\x00\xff" * 500, "invalid_multipart"),
    ("text-plain", "text/plain", b"model=whisper-1", "invalid_content_type"),
    ("urlencoded", "application/x-www-form-urlencoded", b"model=whisper-1&file=a", "invalid_content_type"),
]


@pytest.mark.parametrize(("content_type", "body", "code"), [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
async def test_malformed_multipart(gateway: Gateway, engine: FakeOpenAIEngine, content_type: str, body: bytes,
                                   code: str) -> None:
    status, headers, payload = await raw_request(
        gateway, _head("/v1/audio/transcriptions", content_type, len(body)), body)
    check_error(status, headers, payload, expected_status=400, type_=IRE, code=code)
    assert engine.requests == []


async def test_missing_file(gateway: Gateway, engine: FakeOpenAIEngine) -> None:
    body = _multipart("b0und", MODEL_PART, ("response_format", None, b"json"))
    status, headers, payload = await raw_request(
        gateway, _head("/v1/audio/transcriptions", "multipart/form-data; boundary=b0und", len(body)), body)
    error = check_error(status, headers, payload, expected_status=400, type_=IRE,
                        code="missing_required_parameter", param="file")
    assert error["message"] == "Missing required parameter: 'file'."
    assert engine.requests == []


async def test_missing_model_part(gateway: Gateway) -> None:
    body = _multipart("b0und", FILE_PART)
    status, headers, payload = await raw_request(
        gateway, _head("/v1/audio/translations", "multipart/form-data; boundary=b0und", len(body)), body)
    check_error(status, headers, payload, expected_status=400, type_=IRE, code="missing_required_parameter",
                param="model")


async def test_two_files_rejected(gateway: Gateway) -> None:
    body = _multipart("b0und", MODEL_PART, FILE_PART, ("file", "b.wav", WAV))
    status, headers, payload = await raw_request(
        gateway, _head("/v1/audio/transcriptions", "multipart/form-data; boundary=b0und", len(body)), body)
    check_error(status, headers, payload, expected_status=400, type_=IRE, code=None, param="file")


@pytest.mark.parametrize("body", [b"{not json", b"", b'{"model": "tts-1",}', b"\xff\xfe{}"],
                         ids=["broken", "empty", "trailing-comma", "not-utf8"])
async def test_invalid_json_body(gateway: Gateway, engine: FakeOpenAIEngine, body: bytes) -> None:
    status, headers, payload = await raw_request(
        gateway, _head("/v1/audio/speech", "application/json", len(body)), body)
    error = check_error(status, headers, payload, expected_status=400, type_=IRE, code="invalid_json")
    assert "could not parse the JSON body" in error["message"]
    assert engine.requests == []


# -- uploads over the limit -----------------------------------------------------------------------------


def test_upload_over_limit_with_content_length(servers: ServerThread, client: openai.OpenAI, gateway: Gateway,
                                               engine: FakeOpenAIEngine) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.audio.transcriptions.create(model="whisper-1", file=("big.wav", b"\0" * (LIMIT + 1000), "audio/wav"))
    assert info.value.response.request.headers.get("content-length")  # the SDK did declare the size
    expect_error(info.value, 413, IRE, "request_too_large", None, message=f"({LIMIT})")
    assert engine.requests == []
    assert_settled(servers, gateway, engine)


def test_upload_just_under_limit_is_accepted(client: openai.OpenAI, engine: FakeOpenAIEngine) -> None:
    data = WAV + b"\0" * (LIMIT - 2000 - len(WAV))
    result = client.audio.transcriptions.create(model="whisper-1", file=("big.wav", data, "audio/wav"))
    assert result.text == engine.transcript_text
    assert engine.last.files[0][3] == data


async def _chunked_upload(gateway: Gateway, total: int, seen: list[int]) -> tuple[int, Mapping[str, str], bytes]:
    boundary = "chunky"

    async def body() -> AsyncIterator[bytes]:
        yield _multipart(boundary, MODEL_PART, close=False)
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n'
               "Content-Type: audio/wav\r\n\r\n").encode()
        yield WAV  # real audio first, so an upload under the limit is transcribable; then padding
        sent = len(WAV)
        while sent < total:
            piece = b"\0" * min(256 * 1024, total - sent)
            sent += len(piece)
            seen.append(sent)
            yield piece
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {"Authorization": f"Bearer {DEMO_KEY}", "Content-Type": f"multipart/form-data; boundary={boundary}"}
    async with aiohttp.ClientSession() as s, s.post(gateway.base_url + "/audio/transcriptions", data=body(),
                                                    headers=headers) as r:
        assert r.request_info.headers.get("Transfer-Encoding") == "chunked"
        assert "Content-Length" not in r.request_info.headers
        return r.status, r.headers.copy(), await r.read()


async def test_upload_over_limit_without_content_length(servers: ServerThread, gateway: Gateway,
                                                        engine: FakeOpenAIEngine) -> None:
    seen: list[int] = []
    status, headers, payload = await _chunked_upload(gateway, LIMIT + 300_000, seen)
    check_error(status, headers, payload, expected_status=413, type_=IRE, code="request_too_large",
                message=f"({LIMIT})")
    assert engine.requests == []
    await asyncio.to_thread(assert_settled, servers, gateway, engine)


async def test_chunked_upload_under_limit_is_accepted(gateway: Gateway, engine: FakeOpenAIEngine) -> None:
    seen: list[int] = []
    status, _, payload = await _chunked_upload(gateway, 300_000, seen)
    assert status == 200, payload
    assert len(engine.last.files[0][3]) == 300_000


def test_error_paths_leave_nothing_behind(servers: ServerThread, client: openai.OpenAI, gateway: Gateway,
                                          engine: FakeOpenAIEngine) -> None:
    """A burst of failing uploads big enough to spool to disk: every spool file closed afterwards."""
    big = WAV + b"\0" * 200_000  # > spool_memory_bytes, so the spool is a real temp file
    for kwargs in ({"response_format": "mp3"}, {"temperature": 9}, {"model": "nope"},
                   {"extra_body": {"stream": "maybe"}}, {"timestamp_granularities": ["word"]}):
        with pytest.raises(openai.APIStatusError):
            client.audio.transcriptions.create(**{"model": "whisper-1", "file": ("a.wav", big, "audio/wav"),
                                                  **kwargs})
    with pytest.raises(openai.APIStatusError):
        client.audio.translations.create(model="whisper-1", file=("a.wav", big, "audio/wav"),
                                         extra_body={"language": "en"})
    assert_settled(servers, gateway, engine)
    assert not any(SPOOL_PREFIX in p.name for p in gateway.spool_dir.iterdir())
