"""Budgets (gateway/policy/): the worst case reserved before any backend call, settled to what the request
is billed or released when it is not billable, so concurrent requests never overshoot; `insufficient_quota`
past it. And the failure policy when the state store is down: limits fall back to memory, budgets refuse.
"""

from __future__ import annotations

import asyncio
import datetime
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import openai
import pytest

from gateway.policy.rules import StateSettings
from gateway.policy.shared import SharedState
from gateway.policy.windows import Window, parse_window
from gateway.store import Store, StoreConfig
from tests.conftest import DEMO_KEY, LOOPBACK_TLS, Gateway, engine_config, sdk
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.metering_support import http_get, make_wav, parse_metrics, wait_ledger
from tests.support import free_port

MakeGateway = Callable[[str], Gateway]
PRICED = "tts-1: {task: speech, routes: [{backend: speaches, model: kokoro}]"


def budgeted(engine: FakeOpenAIEngine, tmp_path: Path, policy: str, state: str = "{backend: memory}",
             ledger: Path | None = None) -> str:
    """tts-1 priced at $1,000 per million characters: a 10-character input costs exactly $0.01."""
    text = engine_config(engine.url, tmp_path / "spool").replace(
        PRICED, PRICED + ", price: {per_million_characters: 1000}", 1).replace("timeout_s: 2\n", "timeout_s: 30\n", 1)
    text += f"state: {state}\n" + policy
    if ledger is not None:
        text += f"ledger: {{sink: file, path: {ledger}}}\n"
    return text


async def _speak_all(gw: Gateway, count: int) -> list[BaseException | object]:
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=DEMO_KEY, max_retries=0, timeout=30,
                                  http_client=openai.DefaultAsyncHttpxClient(
                                      verify=LOOPBACK_TLS, limits=openai._constants.DEFAULT_CONNECTION_LIMITS)) as c:
        return await asyncio.gather(*(c.audio.speech.create(model="tts-1", voice="nova", input="0123456789",
                                                            response_format="pcm") for _ in range(count)),
                                    return_exceptions=True)


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_200_concurrent_requests_against_a_budget_for_exactly_50(
        make_gateway: MakeGateway, engine: FakeOpenAIEngine, tmp_path: Path, backend: str) -> None:
    state = "{backend: memory}" if backend == "memory" else f"{{backend: sqlite, path: {tmp_path / 'state.db'}}}"
    ledger = tmp_path / "usage.jsonl"
    gw = make_gateway(budgeted(engine, tmp_path, "tenants: {acme: {budget: {usd: 0.5, period: month}}}\n",
                               state, ledger))
    results = asyncio.run(_speak_all(gw, 200))
    refusals = [r for r in results if isinstance(r, BaseException)]
    assert len(results) - len(refusals) == 50
    assert all(isinstance(r, openai.RateLimitError) for r in refusals), refusals[:3]
    first = refusals[0]
    assert isinstance(first, openai.RateLimitError)
    assert first.body["code"] == "insufficient_quota" and first.body["type"] == "insufficient_quota"
    assert "budget per month of tenant 'acme'" in first.message
    assert first.response.headers["x-should-retry"] == "false"
    assert int(first.response.headers["retry-after"]) <= 31 * 86400
    assert engine.calls("/v1/audio/speech") == 50
    records = wait_ledger(ledger, 200)
    assert round(sum(r["cost_usd"] or 0 for r in records if r["billable"]), 9) == 0.5
    assert {r["rejected_by"] for r in records if r["status"] == 429} == {"tenant:budget/month"}
    samples = parse_metrics(http_get(f"{gw.url}/metrics")[2].decode())
    assert samples[("gateway_budget_remaining", frozenset({("tenant", "acme")}))] == pytest.approx(0, abs=1e-9)


def test_a_failed_request_releases_its_reservation(
        make_gateway: MakeGateway, engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    text = budgeted(engine, tmp_path, "")
    gw = make_gateway(text.replace("tenant: acme, sha256:", "tenant: acme, budget: {characters: 10, period: day},"
                                   " sha256:", 1))
    with sdk(gw) as client:
        engine.mode = "500"
        with pytest.raises(openai.APIStatusError) as failed:
            client.audio.speech.create(model="tts-1", voice="nova", input="0123456789")
        assert failed.value.status_code == 502
        engine.mode = "ok"
        client.audio.speech.create(model="tts-1", voice="nova", input="0123456789")  # the failure cost nothing
        with pytest.raises(openai.RateLimitError) as spent:
            client.audio.speech.create(model="tts-1", voice="nova", input="x")
    assert spent.value.body["code"] == "insufficient_quota"
    assert "the 10 characters budget per day of key 'demo'" in spent.value.message


def test_a_reservation_is_settled_to_what_was_billed(
        make_gateway: MakeGateway, engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    """Speech reserves its worst case in seconds (0.2 s a character) and is settled to the seconds that
    went out; a transcription reserves and settles its measured seconds."""
    ledger = tmp_path / "usage.jsonl"
    gw = make_gateway(budgeted(engine, tmp_path, "tenants: {acme: {budget: {seconds: 100, period: day}}}\n",
                               ledger=ledger))
    with sdk(gw) as client:
        client.audio.speech.create(model="tts-1", voice="nova", input="Hello there, budget.", response_format="pcm")
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", make_wav(1.5)))
    records = wait_ledger(ledger, 2)
    billed = sum(r["audio_seconds"] for r in records)
    assert 1.5 < billed < 1.5 + 20 * 0.2  # the speech settled below its reservation
    samples = parse_metrics(http_get(f"{gw.url}/metrics")[2].decode())
    assert samples[("gateway_budget_remaining", frozenset({("tenant", "acme")}))] == pytest.approx(100 - billed,
                                                                                                  abs=0.002)


def dead_redis(**on_error: str) -> str:
    policy = ", ".join(f"{k}: {v}" for k, v in on_error.items())
    return f"{{backend: redis, url: 'redis://127.0.0.1:{free_port()}/0', on_error: {{{policy}}}}}"


def test_store_down_limits_fall_back_to_memory_and_budgets_refuse(
        make_gateway: MakeGateway, engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    text = budgeted(engine, tmp_path, "limits: {key: [{requests: 2, per: minute}]}\n", dead_redis())
    gw = make_gateway(text.replace("tenant: beta,", "tenant: beta, budget: {usd: 1},", 1))
    with sdk(gw) as client:
        for _ in range(2):
            client.audio.speech.create(model="tts-1", voice="nova", input="counted in memory")
        with pytest.raises(openai.RateLimitError):  # the fallback still limits, in this process
            client.audio.speech.create(model="tts-1", voice="nova", input="counted in memory")
    from tests.conftest import BETA_KEY

    with sdk(gw, key=BETA_KEY) as beta, pytest.raises(openai.InternalServerError) as refused:
        beta.audio.speech.create(model="tts-1", voice="nova", input="no budget without the store")
    assert refused.value.status_code == 503 and refused.value.body["code"] == "state_unavailable"
    assert "redis" not in refused.value.message and "127.0.0.1" not in refused.value.message
    samples = parse_metrics(http_get(f"{gw.url}/metrics")[2].decode())
    assert samples[("gateway_state_fallbacks_total", frozenset({("feature", "limits"), ("action", "memory")}))] >= 3
    assert samples[("gateway_state_fallbacks_total", frozenset({("feature", "budgets"), ("action", "refused")}))] == 1
    assert samples[("gateway_state_errors_total", frozenset({("op", "take")}))] >= 1


def test_store_down_a_closed_feature_refuses_the_whole_admission(
        make_gateway: MakeGateway, engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    """A request's limits and budget are one store operation: with budgets closed it is refused whole, its
    limit not counted in memory meanwhile; each feature it needed is counted as refused."""
    text = budgeted(engine, tmp_path, "limits: {key: [{requests: 1, per: minute}]}\n", dead_redis())
    gw = make_gateway(text.replace("tenant: beta,", "tenant: beta, budget: {usd: 1},", 1))
    from tests.conftest import BETA_KEY

    with sdk(gw, key=BETA_KEY) as beta:
        for _ in range(2):
            with pytest.raises(openai.InternalServerError) as refused:
                beta.audio.speech.create(model="tts-1", voice="nova", input="no budget without the store")
            assert refused.value.status_code == 503 and refused.value.body["code"] == "state_unavailable"
    samples = parse_metrics(http_get(f"{gw.url}/metrics")[2].decode())
    assert samples[("gateway_state_fallbacks_total", frozenset({("feature", "budgets"), ("action", "refused")}))] == 2
    assert samples[("gateway_state_fallbacks_total", frozenset({("feature", "limits"), ("action", "refused")}))] == 2
    assert ("gateway_state_fallbacks_total", frozenset({("feature", "limits"), ("action", "memory")})) not in samples
    with sdk(gw) as client:  # limits alone (demo's key has no budget) go on in memory
        client.audio.speech.create(model="tts-1", voice="nova", input="counted in memory")
        with pytest.raises(openai.RateLimitError):
            client.audio.speech.create(model="tts-1", voice="nova", input="counted in memory")


def test_store_down_with_the_policies_turned_around(
        make_gateway: MakeGateway, engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    text = budgeted(engine, tmp_path, "limits: {key: [{requests: 5, per: minute}]}\n"
                                      "tenants: {acme: {budget: {usd: 0.01}}}\n",
                    dead_redis(limits="closed", budgets="open"))
    gw = make_gateway(text)
    with sdk(gw) as client, pytest.raises(openai.InternalServerError) as refused:
        client.audio.speech.create(model="tts-1", voice="nova", input="0123456789")
    assert refused.value.status_code == 503 and refused.value.response.headers["retry-after"] == "1"
    gw2 = make_gateway(text.replace("requests: 5", "requests: 5, shadow: true").replace(
        "limits: closed", "limits: open"))
    with sdk(gw2) as client:
        client.audio.speech.create(model="tts-1", voice="nova", input="0123456789")  # budget counted in memory
        with pytest.raises(openai.RateLimitError) as spent:
            client.audio.speech.create(model="tts-1", voice="nova", input="0123456789")
    assert spent.value.body["code"] == "insufficient_quota"


def utc(*parts: int) -> float:
    return datetime.datetime(*parts, tzinfo=datetime.UTC).timestamp()


@pytest.mark.parametrize(("now", "anchor", "days"), [
    (utc(2026, 11, 30, 23, 59, 59), utc(2026, 11, 1), 30),
    (utc(2026, 12, 31, 12), utc(2026, 12, 1), 31),
    (utc(2028, 2, 29, 1), utc(2028, 2, 1), 29),  # a leap year's February
    (utc(2027, 2, 1), utc(2027, 2, 1), 28),
])
def test_a_month_is_the_calendar_month_in_utc(now: float, anchor: float, days: int) -> None:
    assert Window("month", 0).bounds(now) == (anchor, days * 86400)


def test_weeks_start_on_monday_and_fixed_windows_on_the_epoch() -> None:
    week = parse_window("week")
    assert isinstance(week, Window)
    anchor, length = week.bounds(utc(2026, 11, 29, 23))  # a Sunday
    assert datetime.datetime.fromtimestamp(anchor, datetime.UTC).weekday() == 0 and length == 7 * 86400
    assert parse_window(90) == Window("90s", 90.0) and parse_window(90).bounds(1e9) == (0.0, 90.0)  # type: ignore[union-attr]
    for bad in (0, -5, float("nan"), float("inf"), 10**12, True, "fortnight", None, [60]):
        assert isinstance(parse_window(bad), str), bad


async def test_gauge_reads_run_off_the_request_one_at_a_time_the_latest_last() -> None:
    """SharedState.read_soon (gateway_budget_remaining's read): the reads asked for while one is under way
    collapse into the latest, which runs once it is done, so the gauge ends on a read made after the
    last settle, at one round trip per read rather than per request."""
    shared = SharedState(StateSettings(StoreConfig(backend="memory")), None)
    store, gate, ran = shared.store, asyncio.Event(), asyncio.Queue[int]()

    def read(n: int) -> Callable[[Store], Awaitable[None]]:
        async def run(_: Store) -> None:
            ran.put_nowait(n)
            await gate.wait()
        return run

    for n in range(5):
        shared.read_soon(store, "tenant:acme|usd", "spent", read(n))
    async with asyncio.timeout(5):
        assert await ran.get() == 0
        gate.set()
        assert await ran.get() == 4  # 1, 2 and 3 never ran
        shared.read_soon(store, "tenant:acme|usd", "spent", read(5))  # none under way: runs at once
        assert await ran.get() == 5
    await asyncio.sleep(0.01)
    assert ran.empty()
    await shared.close()


def test_a_store_that_never_answers_is_tried_three_times_then_skipped_for_retry_s(
        make_gateway: MakeGateway, engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    """A Redis that accepts connections and never answers (a hung host): the first request waits out
    `timeout_s` and is served from the memory fallback; after three such failures in a row the next ones do
    not try the store again."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # the kernel completes the handshakes; nothing ever reads or answers
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        gw = make_gateway(budgeted(engine, tmp_path, "limits: {key: [{requests: 5, per: minute}]}\n",
                                   f"{{backend: redis, url: '{url}', timeout_s: 0.2, retry_s: 60}}"))
        with sdk(gw) as client:
            for _ in range(5):
                client.audio.speech.create(model="tts-1", voice="nova", input="served anyway")
        samples = parse_metrics(http_get(f"{gw.url}/metrics")[2].decode())
    assert samples[("gateway_state_errors_total", frozenset({("op", "take")}))] == 3
    assert samples[("gateway_state_fallbacks_total", frozenset({("feature", "limits"), ("action", "memory")}))] == 5
