"""Gateway keys: missing, wrong, X-API-Key, per-key model lists, request ids, credentials never forwarded."""

from __future__ import annotations

import json
from collections.abc import Mapping

import aiohttp
import openai
import pytest

from tests.conftest import BETA_KEY, DEMO_KEY, ENGINE_KEY, Gateway, ServerThread, sdk
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.support import WAV, assert_settled, check_error, expect_error

SPEECH = {"model": "tts-1", "voice": "nova", "input": "Hello."}
MISSING_KEY_MESSAGE = "You didn't provide an API key."


async def _post(gateway: Gateway, path: str, headers: dict[str, str],
                **kw: object) -> tuple[int, Mapping[str, str], bytes]:
    async with aiohttp.ClientSession() as s, s.post(gateway.url + path, headers=headers, **kw) as r:  # type: ignore[arg-type]
        return r.status, r.headers.copy(), await r.read()


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer "},
    {"Authorization": "Basic ZGVtbzpkZW1v"},
    {"X-API-Key": ""},
], ids=["none", "empty-bearer", "basic", "empty-x-api-key"])
async def test_no_key_is_401_with_openai_message(gateway: Gateway, engine: FakeOpenAIEngine,
                                                 headers: dict[str, str]) -> None:
    status, resp_headers, body = await _post(gateway, "/v1/audio/speech", headers, json=SPEECH)
    error = check_error(status, resp_headers, body, expected_status=401, type_="invalid_request_error", code=None)
    assert error["message"].startswith(MISSING_KEY_MESSAGE)
    assert engine.requests == []


async def test_no_key_checked_before_the_body(gateway: Gateway, engine: FakeOpenAIEngine) -> None:
    """Auth comes first: an unauthenticated caller learns nothing about validation."""
    status, headers, body = await _post(gateway, "/v1/audio/speech", {"Content-Type": "application/json"},
                                        data=b"{not json")
    check_error(status, headers, body, expected_status=401, type_="invalid_request_error", code=None)
    form = aiohttp.FormData()
    form.add_field("model", "whisper-1")
    status, headers, body = await _post(gateway, "/v1/audio/transcriptions", {}, data=form)
    check_error(status, headers, body, expected_status=401, type_="invalid_request_error", code=None)
    assert engine.requests == []


def test_wrong_key_is_401_invalid_api_key(gateway: Gateway, engine: FakeOpenAIEngine) -> None:
    wrong = "sk-test-wrong-key-55555"
    with sdk(gateway.base_url, wrong) as c:
        with pytest.raises(openai.AuthenticationError) as info:
            c.audio.speech.create(model="tts-1", voice="nova", input="Hi.")
    expect_error(info.value, 401, "invalid_request_error", "invalid_api_key", secrets=(wrong, "55555"))
    assert engine.requests == []


def test_wrong_key_on_transcriptions_and_models(gateway: Gateway, engine: FakeOpenAIEngine) -> None:
    with sdk(gateway.base_url, "sk-nope") as c:
        with pytest.raises(openai.AuthenticationError) as info:
            c.audio.transcriptions.create(model="whisper-1", file=("a.wav", WAV, "audio/wav"))
        expect_error(info.value, 401, "invalid_request_error", "invalid_api_key", secrets=("sk-nope",))
        with pytest.raises(openai.AuthenticationError) as info:
            c.models.list()
        expect_error(info.value, 401, "invalid_request_error", "invalid_api_key", secrets=("sk-nope",))
    assert engine.requests == []


def test_x_api_key_header_accepted_for_transcriptions(gateway: Gateway, engine: FakeOpenAIEngine) -> None:
    with sdk(gateway.base_url, "unused",
             default_headers={"Authorization": "", "X-API-Key": DEMO_KEY}) as c:
        result = c.audio.transcriptions.create(model="whisper-1", file=("a.wav", WAV, "audio/wav"))
        models = c.models.list()
    assert result.text == engine.transcript_text
    assert {m.id for m in models.data} >= {"tts-1", "whisper-1"}
    sent = json.dumps(dict(engine.last.headers))
    assert DEMO_KEY not in sent
    assert engine.last.headers["Authorization"] == f"Bearer {ENGINE_KEY}"


def test_wrong_x_api_key_is_invalid_api_key(gateway: Gateway) -> None:
    with sdk(gateway.base_url, "unused",
             default_headers={"Authorization": "", "X-API-Key": "sk-other"}) as c:
        with pytest.raises(openai.AuthenticationError) as info:
            c.audio.speech.create(model="tts-1", voice="nova", input="Hi.")
    expect_error(info.value, 401, "invalid_request_error", "invalid_api_key", secrets=("sk-other",))


def test_key_restricted_to_its_models(gateway: Gateway, engine: FakeOpenAIEngine) -> None:
    with sdk(gateway.base_url, BETA_KEY) as c:
        audio = c.audio.speech.create(model="tts-1", voice="nova", input="Allowed.")
        assert len(audio.content) > 100
        with pytest.raises(openai.PermissionDeniedError) as info:
            c.audio.speech.create(model="tts-1-hd", voice="nova", input="Not allowed.")
        expect_error(info.value, 403, "invalid_request_error", "model_not_found", "model")
        with pytest.raises(openai.PermissionDeniedError) as info:
            c.audio.transcriptions.create(model="whisper-1", file=("a.wav", WAV, "audio/wav"))
        expect_error(info.value, 403, "invalid_request_error", "model_not_found", "model")
    assert [r.json["model"] for r in engine.requests] == ["kokoro"]


@pytest.mark.parametrize("key", [DEMO_KEY, BETA_KEY])
def test_unknown_model_is_404_for_every_key(gateway: Gateway, key: str) -> None:
    with sdk(gateway.base_url, key) as c:
        with pytest.raises(openai.NotFoundError) as info:
            c.audio.speech.create(model="tts-9000", voice="nova", input="Hi.")
    error = expect_error(info.value, 404, "invalid_request_error", "model_not_found", "model")
    assert error["message"] == "The model `tts-9000` does not exist or you do not have access to it."


def test_client_request_id_is_echoed_and_forwarded(client: openai.OpenAI, engine: FakeOpenAIEngine) -> None:
    rid = "client-trace-42.abc"
    raw = client.audio.speech.with_raw_response.create(model="tts-1", voice="nova", input="Hi.",
                                                       extra_headers={"X-Request-ID": rid})
    assert raw.headers["x-request-id"] == rid
    assert engine.last.headers["X-Request-ID"] == rid
    result = client.audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=("a.wav", WAV, "audio/wav"), extra_headers={"X-Request-ID": "tr-1"})
    assert result.headers["x-request-id"] == "tr-1"
    assert engine.last.headers["X-Request-ID"] == "tr-1"


def test_client_request_id_echoed_on_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.speech.create(model="tts-1", voice="nova", input="", extra_headers={"X-Request-ID": "err-7"})
    assert info.value.request_id == "err-7"


def test_unsafe_request_id_is_replaced(client: openai.OpenAI, engine: FakeOpenAIEngine) -> None:
    raw = client.audio.speech.with_raw_response.create(model="tts-1", voice="nova", input="Hi.",
                                                       extra_headers={"X-Request-ID": "bad id;<script>"})
    rid = raw.headers["x-request-id"]
    assert rid and rid != "bad id;<script>"
    assert engine.last.headers["X-Request-ID"] == rid


def test_minted_request_ids_are_unique(client: openai.OpenAI, engine: FakeOpenAIEngine) -> None:
    ids = {client.audio.speech.with_raw_response.create(model="tts-1", voice="nova", input="Hi.")
           .headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3
    assert {r.headers["X-Request-ID"] for r in engine.requests} == ids


async def test_unauthenticated_errors_carry_request_id(gateway: Gateway) -> None:
    status, headers, body = await _post(gateway, "/v1/audio/speech", {"X-Request-ID": "anon-1"}, json=SPEECH)
    check_error(status, headers, body, expected_status=401, type_="invalid_request_error", code=None)
    assert headers["x-request-id"] == "anon-1"


def test_auth_failures_leave_nothing_behind(servers: ServerThread, gateway: Gateway, engine: FakeOpenAIEngine) -> None:
    with sdk(gateway.base_url, "sk-bad") as c:
        for _ in range(3):
            with pytest.raises(openai.AuthenticationError):
                c.audio.transcriptions.create(model="whisper-1", file=("a.wav", WAV * 40, "audio/wav"))
    assert_settled(servers, gateway, engine)
