"""Rate limits and quotas (gateway/policy/): per key, tenant and (tenant, model), in requests, characters,
audio seconds and concurrent requests, answered before any backend is called with OpenAI's 429 and its
x-ratelimit-* headers, read through the official SDK's `with_raw_response`. In-process gateways on the
`memory` store; the same code on SQLite and Redis across processes is tests/test_shared_state.py.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from tests.conftest import BETA_KEY, DEMO_KEY, LOOPBACK_TLS, Gateway, engine_config, sdk
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.metering_support import http_get, make_wav, parse_metrics, wait_ledger
from tests.redis_cluster import Cluster

MakeGateway = Callable[[str], Gateway]


def limited(engine: FakeOpenAIEngine, tmp_path: Path, policy: str, key_rules: str = "") -> str:
    """The test table on the memory store, with `key_rules` on the demo key and `policy` appended."""
    text = engine_config(engine.url, tmp_path / "spool") + "state: {backend: memory}\n" + policy
    if key_rules:
        text = text.replace("tenant: acme, sha256:", f"tenant: acme, {key_rules}, sha256:", 1)
    return text


def speak(client: openai.OpenAI, text: str = "Hello there.", model: str = "tts-1") -> object:
    return client.audio.speech.with_raw_response.create(model=model, voice="nova", input=text,
                                                        response_format="pcm")


def refused(call: Callable[[], object]) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as info:
        call()
    return info.value


def gives_landed(gw: Gateway, count: int) -> None:
    """Wait until `count` store gives were made: counting after the fact happens just after the response ends."""
    deadline = time.monotonic() + 5
    while parse_metrics(http_get(f"{gw.url}/metrics")[2].decode()).get(
            ("gateway_state_operation_seconds_count", frozenset({("op", "give")})), 0) < count:
        assert time.monotonic() < deadline, f"fewer than {count} gives"
        time.sleep(0.01)


def test_a_request_limit_lets_exactly_n_through_then_answers_openais_429(
        make_gateway: MakeGateway, engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    gw = make_gateway(limited(engine, tmp_path, "", "limits: [{requests: 3, per: minute}]"))
    with sdk(gw) as client:
        for remaining in (2, 1, 0):
            raw = speak(client)
            assert raw.headers["x-ratelimit-limit-requests"] == "3"
            assert raw.headers["x-ratelimit-remaining-requests"] == str(remaining)
            assert re.fullmatch(r"(\d+ms|\d+(\.\d+)?s)", raw.headers["x-ratelimit-reset-requests"])
        error = refused(lambda: speak(client))
    assert engine.calls("/v1/audio/speech") == 3  # the refusal came before any backend call
    assert error.status_code == 429
    assert error.body == {"message": error.body["message"], "type": "requests", "param": None,
                          "code": "rate_limit_exceeded"}
    assert "requests per minute on key 'demo'" in error.message and "Limit 3, Used 3" in error.message
    headers = error.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60
    assert 0 < int(headers["retry-after-ms"]) <= 60_000
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-should-retry" not in headers  # a wait within a minute: the SDK's own retry may take it
    assert headers["x-request-id"]


def test_characters_and_audio_seconds_count_what_each_endpoint_consumes(
        make_gateway: MakeGateway, engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    gw = make_gateway(limited(engine, tmp_path, """
limits:
  tenant: [{characters: 25, per: hour}, {audio_seconds: 2.5, per: day}]
"""))
    one_second = make_wav(1.0)
    with sdk(gw) as client:
        assert speak(client, "0123456789").headers["x-ratelimit-remaining-characters"] == "15"
        assert speak(client, "0123456789").headers["x-ratelimit-remaining-characters"] == "5"
        error = refused(lambda: speak(client, "0123456789"))
        assert "characters per hour on tenant 'acme'" in error.message
        assert error.response.headers["x-ratelimit-remaining-characters"] == "5"
        speak(client, "01234")  # what is left still serves

        for remaining in ("1.5", "0.5"):
            raw = client.audio.transcriptions.with_raw_response.create(model="whisper-1", file=("a.wav", one_second))
            assert raw.headers["x-ratelimit-remaining-audio-seconds"] == remaining
            assert "x-ratelimit-remaining-characters" not in raw.headers  # not a speech request
        error = refused(lambda: client.audio.transcriptions.create(model="whisper-1", file=("a.wav", one_second)))
        assert "audio seconds per day" in error.message
    assert engine.calls("/v1/audio/transcriptions") == 2


def test_a_refusal_by_a_later_limit_gives_back_what_earlier_ones_counted(
        make_gateway: MakeGateway, engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    hd = "tts-1-hd: {task: speech, routes: [{backend: speaches, model: kokoro-hd}]"
    text = limited(engine, tmp_path, "", "limits: [{requests: 5, per: minute}]")
    gw = make_gateway(text.replace(hd, hd + ", limits: [{characters: 10, per: minute}]", 1))
    with sdk(gw) as client:
        assert speak(client, "12345678", "tts-1-hd").headers["x-ratelimit-remaining-requests"] == "4"
        error = refused(lambda: speak(client, "12345678", "tts-1-hd"))
        assert "for model `tts-1-hd`" in error.message
        assert speak(client, "12", "tts-1-hd").headers["x-ratelimit-remaining-requests"] == "3"


def test_levels_defaults_and_overrides(make_gateway: MakeGateway, engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    """`limits.key` applies to a key without limits of its own; `limits: []` on a key turns it off; a tenant's
    limits on a model replace the model's own."""
    text = limited(engine, tmp_path, """
limits:
  key: [{requests: 1, per: minute}]
  model: [{requests: 100, per: minute}]
tenants:
  beta:
    models: {tts-1: [{requests: 2, per: hour}]}
""", "limits: []")
    gw = make_gateway(text)
    with sdk(gw) as demo, sdk(gw, key=BETA_KEY) as beta:
        for _ in range(3):
            assert speak(demo).headers["x-ratelimit-remaining-requests"].startswith("9")  # only the model default
        assert speak(beta).headers["x-ratelimit-remaining-requests"] == "0"  # key default (1), tighter than 2
        error = refused(lambda: speak(beta))
        assert "on key 'beta'" in error.message


def test_concurrent_requests_are_capped_and_freed_when_a_stream_ends(
        make_gateway: MakeGateway, engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    engine.chunk_size, engine.chunk_delay = 4096, 0.01
    gw = make_gateway(limited(engine, tmp_path, "", "limits: [{concurrent: 1}]"))
    started, release = threading.Event(), threading.Event()

    def stream() -> None:
        with sdk(gw) as client, client.audio.speech.with_streaming_response.create(
                model="tts-1", voice="nova", input="Hello there.", response_format="pcm") as response:
            chunks = response.iter_bytes(4096)
            next(chunks)
            started.set()
            release.wait(10)
            for _ in chunks:
                pass

    holder = threading.Thread(target=stream)
    holder.start()
    assert started.wait(10)
    with sdk(gw) as client:
        error = refused(lambda: speak(client))
        assert "Too many concurrent requests on key 'demo': Limit 1" in error.message
        assert error.response.headers["retry-after"] == "1"
        release.set()
        holder.join(10)
        speak(client)  # the slot came back when the stream ended


def test_shadow_limits_count_and_log_but_refuse_nothing(
        make_gateway: MakeGateway, engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    gw = make_gateway(limited(engine, tmp_path, "", "limits: [{requests: 1, per: minute, shadow: true}]"))
    with sdk(gw) as client:
        for _ in range(3):
            assert "x-ratelimit-limit-requests" not in speak(client).headers
    samples = parse_metrics(http_get(f"{gw.url}/metrics")[2].decode())
    labels = frozenset({("tenant", "acme"), ("limit", "key:requests/minute")})
    assert samples[("gateway_ratelimit_shadow_rejections_total", labels)] == 2
    assert ("gateway_ratelimit_rejections_total", labels) not in samples
    assert engine.calls("/v1/audio/speech") == 3


def test_a_refusal_is_in_the_metrics_and_the_ledger_naming_its_limit(
        make_gateway: MakeGateway, engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    ledger = tmp_path / "usage.jsonl"
    gw = make_gateway(limited(engine, tmp_path, f"ledger: {{sink: file, path: {ledger}}}\n",
                              "limits: [{requests: 1, per: day}]"))
    with sdk(gw) as client:
        speak(client)
        error = refused(lambda: speak(client))
    assert error.response.headers["x-should-retry"] == "false"  # a day's wait: no automatic retry
    records = wait_ledger(ledger, 2)
    assert [r["rejected_by"] for r in records] == [None, "key:requests/day"]
    assert records[1]["status"] == 429 and records[1]["billable"] is False
    samples = parse_metrics(http_get(f"{gw.url}/metrics")[2].decode())
    assert samples[("gateway_ratelimit_rejections_total",
                    frozenset({("tenant", "acme"), ("limit", "key:requests/day")}))] == 1


def test_speech_seconds_are_counted_once_the_audio_went_out(
        make_gateway: MakeGateway, engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    """The seconds a speech request produces are known only afterwards: a request is admitted while any
    are left, and its audio is counted when it is over, even past the limit."""
    gw = make_gateway(limited(engine, tmp_path, "", "limits: [{speech_seconds: 1.5, per: hour}]"))
    with sdk(gw) as client:
        first = speak(client, "One second of speech.")
        assert first.headers["x-ratelimit-remaining-speech-seconds"] == "1.5"  # nothing counted before it
        speak(client, "One more second of it.")  # 1.5 s was left before this one
        gives_landed(gw, 2)  # each request: a take to check for room, a give to count its audio once it is over
        error = refused(lambda: speak(client, "And a third."))
        assert "speech seconds per hour" in error.message
        assert error.response.headers["x-ratelimit-remaining-speech-seconds"] == "0"
    assert engine.calls("/v1/audio/speech") == 2


def test_a_request_limit_on_a_redis_cluster_lets_exactly_n_through(
        make_gateway: MakeGateway, engine: FakeOpenAIEngine, tmp_path: Path, redis_cluster: Cluster) -> None:
    """`state: {backend: redis, cluster: true}` on a real three-node cluster, with a key prefix that puts the
    key's count, the tenant's count and the tenant's concurrency slots on three different nodes. Limits fail
    closed here, so a store operation that failed would answer 503 rather than count in memory."""
    scopes = ("key:demo|requests/minute", "tenant:acme|requests/minute", "tenant:acme|concurrent")
    prefix = next(p for p in (f"e2e-{uuid.uuid4().hex[:8]}" for _ in range(500))
                  if len({redis_cluster.owner(f"{{{p}:{scope}}}") for scope in scopes}) == 3)
    state = (f"state: {{backend: redis, cluster: true, url: '{redis_cluster.url}', key_prefix: {prefix}, "
             "timeout_s: 5, on_error: {limits: closed}}\n")
    text = limited(engine, tmp_path, "tenants: {acme: {limits: [{requests: 100, per: minute}, {concurrent: 20}]}}\n",
                   "limits: [{requests: 4, per: minute}]")
    gw = make_gateway(text.replace("state: {backend: memory}\n", state, 1))

    async def twelve_at_once() -> list[BaseException | object]:
        async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=DEMO_KEY, max_retries=0, timeout=20,
                                      http_client=openai.DefaultAsyncHttpxClient(verify=LOOPBACK_TLS)) as c:
            return await asyncio.gather(*(c.audio.speech.create(model="tts-1", voice="nova", input="Hello.",
                                                                response_format="pcm") for _ in range(12)),
                                        return_exceptions=True)

    results = asyncio.run(twelve_at_once())
    refusals = [r for r in results if isinstance(r, BaseException)]
    assert len(results) - len(refusals) == 4 and engine.calls("/v1/audio/speech") == 4
    assert all(isinstance(r, openai.RateLimitError) and r.body["code"] == "rate_limit_exceeded"
               for r in refusals), refusals[:3]
    for scope in scopes[:2]:  # each count is on the node its slot belongs to
        owner = redis_cluster.owner(f"{{{prefix}:{scope}}}")
        assert redis_cluster.ask(owner, "HGET", f"{{{prefix}:{scope}}}:h:60000", "n") == "4", scope
    samples = parse_metrics(http_get(f"{gw.url}/metrics")[2].decode())
    assert samples[("gateway_state_operation_seconds_count", frozenset({("op", "take")}))] == 12
    assert not [name for name, _ in samples if name in ("gateway_state_errors_total",
                                                        "gateway_state_fallbacks_total")]
