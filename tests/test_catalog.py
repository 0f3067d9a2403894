"""GET /v1/models, /v1/audio/voices, /healthz, /readyz, and CORS preflights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import aiohttp
import httpx2
import openai
import pytest

from tests.conftest import BETA_KEY, Gateway, ServerThread, engine_config, sdk
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.support import check_error, free_port, probe_backends


def test_models_list_shape(client: openai.OpenAI) -> None:
    raw = client.models.with_raw_response.list()
    body = raw.http_response.json()
    assert set(body) == {"object", "data"} and body["object"] == "list"
    assert {m["id"] for m in body["data"]} == {"tts-1", "tts-1-hd", "whisper-1"}
    for model in body["data"]:
        assert model["object"] == "model"
        assert isinstance(model["created"], int) and model["created"] > 1_600_000_000
        assert isinstance(model["owned_by"], str) and model["owned_by"]
    page = raw.parse()
    assert sorted(m.id for m in page) == ["tts-1", "tts-1-hd", "whisper-1"]
    assert raw.headers["x-request-id"]


def test_models_for_restricted_key(gateway: Gateway) -> None:
    with sdk(gateway.base_url, BETA_KEY) as c:
        assert [m.id for m in c.models.list()] == ["tts-1"]


def test_models_do_not_touch_the_engine(client: openai.OpenAI, engine: FakeOpenAIEngine) -> None:
    client.models.list()
    assert engine.requests == []


def test_voices(client: openai.OpenAI) -> None:
    body = client.get("/audio/voices", cast_to=httpx2.Response).json()
    assert body["object"] == "list"
    by_name = {v["voice"]: v for v in body["data"]}
    assert by_name["nova"] == {"voice": "nova", "backend": "speaches", "native_voice": "af_nova", "speaker": None}
    assert by_name["alloy"]["native_voice"] == "af_alloy"
    assert all("url" not in v and "127.0.0.1" not in str(v) for v in body["data"])


async def test_voices_need_a_key(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as s, s.get(gateway.base_url + "/audio/voices") as r:
        check_error(r.status, r.headers, await r.read(), expected_status=401, type_="invalid_request_error",
                    code=None)


async def test_healthz_and_readyz_without_a_key(servers: ServerThread, gateway: Gateway,
                                                engine: FakeOpenAIEngine) -> None:
    probe_backends(servers, gateway)
    async with aiohttp.ClientSession() as s:
        async with s.get(gateway.url + "/healthz") as r:
            assert r.status == 200
            assert (await r.json())["status"] == "ok"
            assert r.headers["x-request-id"]
        async with s.get(gateway.url + "/readyz") as r:
            assert r.status == 200, await r.text()
            body = await r.json()
    assert body["status"] == "ready"
    assert body["backends"] == {"speaches": "up"}
    assert body["unroutable_models"] == []
    assert "127.0.0.1" not in str(body)
    assert engine.last.path == "/v1/models"


async def test_readyz_stays_200_when_the_only_backend_is_down(servers: ServerThread,
                                                              make_gateway: Callable[[str], Gateway],
                                                              tmp_path: Path) -> None:
    """Readiness is "config loaded, not draining": a backend outage is reported, it does not unready the pod
    (tests/test_health.py has the background prober itself)."""
    gw = make_gateway(engine_config(f"http://127.0.0.1:{free_port()}/v1", tmp_path / "spool"))
    probe_backends(servers, gw)
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/readyz") as r:
            assert r.status == 200
            body = await r.json()
            assert r.headers["x-request-id"]
    assert body["status"] == "ready"
    assert body["backends"] == {"speaches": "down"}
    assert sorted(body["unroutable_models"]) == ["tts-1", "tts-1-hd", "whisper-1"]
    assert "127.0.0.1" not in str(body)


async def test_readyz_follows_the_probes(servers: ServerThread, gateway: Gateway, engine: FakeOpenAIEngine) -> None:
    async with aiohttp.ClientSession() as s:
        engine.mode = "500"
        probe_backends(servers, gateway)
        async with s.get(gateway.url + "/readyz") as r:
            assert r.status == 200 and (await r.json())["backends"] == {"speaches": "down"}
        engine.mode = "ok"
        probe_backends(servers, gateway)
        async with s.get(gateway.url + "/readyz") as r:
            assert r.status == 200 and (await r.json())["backends"] == {"speaches": "up"}


@pytest.mark.parametrize("path", ["/v1/audio/speech", "/v1/audio/transcriptions", "/v1/models"])
async def test_cors_preflight_without_a_key(gateway: Gateway, path: str) -> None:
    headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST" if "audio" in path else "GET",
               "Access-Control-Request-Headers": "authorization, content-type"}
    async with aiohttp.ClientSession() as s, s.options(gateway.url + path, headers=headers) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert headers["Access-Control-Request-Method"] in r.headers["Access-Control-Allow-Methods"]
        assert "authorization" in r.headers.get("Access-Control-Allow-Headers", "").lower()


async def test_cors_preflight_from_unknown_origin_refused(gateway: Gateway) -> None:
    headers = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    async with aiohttp.ClientSession() as s, s.options(gateway.url + "/v1/audio/speech", headers=headers) as r:
        error = check_error(r.status, r.headers, await r.read(), expected_status=403,
                            type_="invalid_request_error", code=None)
        assert "Access-Control-Allow-Origin" not in r.headers
    assert "CORS preflight request failed" in error["message"]


async def test_cors_headers_on_actual_responses(gateway: Gateway) -> None:
    """The browser also needs the CORS headers on the real answer, success or error, to read it."""
    headers = {"Origin": "https://app.example"}
    async with aiohttp.ClientSession() as s:
        async with s.get(gateway.base_url + "/models", headers={**headers, "Authorization": f"Bearer {BETA_KEY}"}) as r:
            assert r.status == 200
            assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "x-request-id" in r.headers.get("Access-Control-Expose-Headers", "").lower()
        async with s.post(gateway.base_url + "/audio/speech", headers=headers, json={}) as r:
            assert r.status == 401
            assert r.headers.get("Access-Control-Allow-Origin") == "https://app.example"
