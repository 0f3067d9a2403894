"""Hostile requests meeting the traffic policy (gateway/policy/): an input at the characters limit, uploads
refused by their measurement (they count nothing), a client leaving mid-stream with a concurrency slot and a
budget reservation (both given back), a refusal at the model level after the key and tenant counted (refunded),
and a reload that changes limits (the next request sees them; a `state:` change only warns).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from aiohttp import web

from gateway.app import build_app
from gateway.config import parse_config
from gateway.policy.windows import Window, parse_window
from gateway.state import RELOADER, SHARED_STATE
from tests.conftest import DEMO_KEY, Gateway, ServerThread, engine_config, sdk, serve_app
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.metering_support import http_get, make_wav, parse_metrics
from tests.support import assert_settled, loop_tasks

MakeGateway = Callable[[str], Gateway]
AUTH = {"Authorization": f"Bearer {DEMO_KEY}"}
DAY = parse_window("day")
assert isinstance(DAY, Window)


def limited(engine: FakeOpenAIEngine, tmp_path: Path, policy: str = "", key_rules: str = "",
            server: str = "") -> str:
    text = engine_config(engine.url, tmp_path / "spool").replace("server:\n", f"server:\n{server}", 1)
    if key_rules:
        text = text.replace("tenant: acme, sha256:", f"tenant: acme, {key_rules}, sha256:", 1)
    return text + "state: {backend: memory}\n" + policy


def budget_remaining(gw: Gateway) -> float:
    samples = parse_metrics(http_get(f"{gw.url}/metrics")[2].decode())
    return samples[("gateway_budget_remaining", frozenset({("tenant", "acme")}))]


def test_an_input_at_the_characters_limit_counts_code_points_and_an_oversized_one_counts_nothing(
        make_gateway: MakeGateway, engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    gw = make_gateway(limited(engine, tmp_path, key_rules="limits: [{characters: 5000, per: hour}]"))
    with sdk(gw) as client:
        def speak(text: str) -> object:
            return client.audio.speech.with_raw_response.create(model="tts-1", voice="nova", input=text,
                                                                response_format="pcm")

        assert speak("x" * 4096).headers["x-ratelimit-remaining-characters"] == "904"
        with pytest.raises(openai.BadRequestError) as too_long:  # past OpenAI's 4096: refused before the policy
            speak("x" * 4097)
        assert too_long.value.body["code"] == "string_above_max_length"
        with pytest.raises(openai.RateLimitError) as refused:
            speak("x" * 4096)
        assert "Limit 5000, Used 4096, Requested 4096" in refused.value.message
        assert refused.value.response.headers["x-ratelimit-remaining-characters"] == "904"
        assert speak("é☃" * 452).headers["x-ratelimit-remaining-characters"] == "0"  # characters, not bytes
    assert engine.calls("/v1/audio/speech") == 2


def test_uploads_refused_by_their_measurement_count_nothing(
        make_gateway: MakeGateway, engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    """Undecodable, or past server.max_audio_seconds: the measurement's 400, before any limit or budget
    took anything; the next request's x-ratelimit-remaining-* shows it."""
    gw = make_gateway(limited(engine, tmp_path, "limits: {tenant: [{audio_seconds: 10, per: hour}, "
                                                "{requests: 10, per: hour}]}\n",
                              key_rules="budget: {seconds: 2.5, period: day}", server="  max_audio_seconds: 2\n"))
    one_second = make_wav(1.0)
    with sdk(gw) as client:
        def transcribe(data: bytes, name: str = "a.wav") -> object:
            return client.audio.transcriptions.with_raw_response.create(model="whisper-1", file=(name, data))

        first = transcribe(one_second).headers
        assert (first["x-ratelimit-remaining-audio-seconds"], first["x-ratelimit-remaining-requests"]) == ("9", "9")
        for hostile in (make_wav(3.0), b"RIFF\xff\xff\xff\xffWAVEjunk" + bytes(5000), b"\x00" * 70_000):
            with pytest.raises(openai.BadRequestError) as bad:
                transcribe(hostile, "a.mp3" if hostile[0] == 0 else "a.wav")
            assert bad.value.status_code == 400 and bad.value.body["type"] == "invalid_request_error"
        second = transcribe(one_second).headers  # the 2.5 s budget still holds this second: nothing was reserved
        assert (second["x-ratelimit-remaining-audio-seconds"], second["x-ratelimit-remaining-requests"]) == ("8", "8")
        with pytest.raises(openai.RateLimitError) as over:
            transcribe(one_second)
        assert over.value.body["code"] == "insufficient_quota"
    assert engine.calls("/v1/audio/transcriptions") == 2


async def _wait(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(150):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def spent(servers: ServerThread, gw: Gateway) -> float:
    """What the tenant's `characters` budget holds today, read from the gateway's own store."""
    anchor, length = DAY.bounds(time.time())
    return servers.run(gw.app[SHARED_STATE].store.spent("tenant:acme|characters", length, anchor_s=anchor))


def renewals(servers: ServerThread) -> list[asyncio.Task[object]]:
    """The tasks renewing a request's concurrency leases (Admission._renew)."""
    return [t for t in loop_tasks(servers) if "_renew" in repr(t.get_coro())]


async def test_a_client_leaving_mid_stream_gives_back_its_slot_and_its_reservation(
        servers: ServerThread, make_gateway: MakeGateway, engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    engine.chunk_size = 4096
    gw = make_gateway(limited(engine, tmp_path, "tenants: {acme: {budget: {characters: 100, period: day}}}\n",
                              key_rules="limits: [{concurrent: 1}]"))
    body = {"model": "tts-1", "voice": "nova", "response_format": "pcm"}
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.base_url + "/audio/speech", json={**body, "input": "x" * 10}, headers=AUTH) as r:
            assert r.status == 200
            await r.read()
        assert budget_remaining(gw) == 90
        engine.chunk_delay = 0.05  # 60 characters: seconds of audio, sent slowly
        held = await session.post(gw.base_url + "/audio/speech", json={**body, "input": "y" * 60}, headers=AUTH)
        assert held.status == 200
        received = 0
        while received < 2 * 4096:
            received += len(await held.content.readany())
        assert len(renewals(servers)) == 1
        assert spent(servers, gw) == 70  # 10 settled, 60 reserved
        async with session.post(gw.base_url + "/audio/speech", json={**body, "input": "z"}, headers=AUTH) as r:
            assert r.status == 429 and "Too many concurrent requests" in (await r.json())["error"]["message"]
        held.close()  # gone mid-stream, holding the slot and 60 characters reserved
        await _wait(lambda: engine.cancelled == 1, "the engine's handler to be cancelled")
        engine.chunk_delay = 0
        await asyncio.to_thread(assert_settled, servers, gw, engine)
        await _wait(lambda: not renewals(servers), "the lease renewal to end")
        await _wait(lambda: spent(servers, gw) == 10, "the reservation to be released")  # an unfinished stream
        async with session.post(gw.base_url + "/audio/speech", json={**body, "input": "w" * 90}, headers=AUTH) as r:
            assert r.status == 200  # the slot is free and the whole 90 is there again
            await r.read()
    assert budget_remaining(gw) == 0


def test_a_refusal_at_the_model_level_refunds_the_key_and_tenant_hits(
        make_gateway: MakeGateway, engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    hd = "tts-1-hd: {task: speech, routes: [{backend: speaches, model: kokoro-hd}]"
    text = limited(engine, tmp_path, "tenants: {acme: {limits: [{requests: 4, per: minute}]}}\n",
                   key_rules="limits: [{requests: 6, per: minute}, {characters: 100, per: minute}]")
    gw = make_gateway(text.replace(hd, hd + ", limits: [{characters: 10, per: minute}]", 1))
    with sdk(gw) as client:
        def speak(text: str, model: str) -> dict[str, str]:
            return dict(client.audio.speech.with_raw_response.create(model=model, voice="nova", input=text,
                                                                     response_format="pcm").headers)

        first = speak("12345678", "tts-1-hd")
        assert (first["x-ratelimit-remaining-requests"], first["x-ratelimit-remaining-characters"]) == ("3", "2")
        with pytest.raises(openai.RateLimitError) as refused:
            speak("12345678", "tts-1-hd")
        assert "on tenant 'acme' for model `tts-1-hd`: Limit 10, Used 8, Requested 8" in refused.value.message
        after = speak("12", "tts-1")  # the tenant's requests and the key's characters got their hit back
        assert (after["x-ratelimit-remaining-requests"], after["x-ratelimit-remaining-characters"]) == ("2", "90")
    samples = parse_metrics(http_get(f"{gw.url}/metrics")[2].decode())
    assert samples[("gateway_ratelimit_rejections_total",
                    frozenset({("tenant", "acme"), ("limit", "model:characters/minute")}))] == 1
    assert engine.calls("/v1/audio/speech") == 2


@pytest.fixture
def file_gateway(servers: ServerThread, tmp_path: Path) -> Iterator[Callable[[Path], Gateway]]:
    """A gateway built from a config file, so it has its reloader (the file is not watched)."""
    runners: list[web.AppRunner] = []

    async def start(path: Path, text: str) -> Gateway:
        config = parse_config(text, source=str(path))
        gateway = await serve_app(build_app(config), config, tmp_path / "spool")
        runners.append(gateway.runner)
        return gateway

    (tmp_path / "spool").mkdir()
    yield lambda path: servers.run(start(path, path.read_text()))
    for runner in runners:
        servers.run(runner.cleanup())


def test_a_reload_changes_limits_for_the_next_request_and_state_only_warns(
        servers: ServerThread, file_gateway: Callable[[Path], Gateway], engine: FakeOpenAIEngine, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "gateway.yaml"
    base = limited(engine, tmp_path, key_rules="limits: [{requests: 2, per: minute}]",
                   server="  reload_interval_s: 0\n")
    path.write_text(base)
    gw = file_gateway(path)

    def remaining() -> str:
        with sdk(gw) as client:
            return client.audio.speech.with_raw_response.create(model="tts-1", voice="nova", input="Hi.",
                                                                response_format="pcm").headers[
                "x-ratelimit-remaining-requests"]

    async def reload() -> bool | None:
        return await gw.app[RELOADER].reload("test")

    assert remaining() == "1"
    sqlite = tmp_path / "state.db"
    path.write_text(base.replace("requests: 2,", "requests: 5,").replace(
        "state: {backend: memory}", f"state: {{backend: sqlite, path: {sqlite}}}"))
    with caplog.at_level(logging.WARNING, logger="gateway.reload"):
        assert servers.run(reload()) is True
    assert "config reload: changes to 'state' take effect at the next restart" in caplog.text
    assert remaining() == "3"  # the new limit, on the same counter: 2 of 5 taken
    assert gw.app[SHARED_STATE].settings.store.backend == "memory" and not sqlite.exists()
    path.write_text(base.replace("limits: [{requests: 2, per: minute}], ", ""))
    assert servers.run(reload()) is True
    with sdk(gw) as client:  # no limit left anywhere: the policy is off, no x-ratelimit-* headers
        headers = client.audio.speech.with_raw_response.create(model="tts-1", voice="nova", input="Hi.",
                                                               response_format="pcm").headers
    assert "x-ratelimit-remaining-requests" not in headers
