"""Issue 12 across processes: limits and budgets exact when several gateway processes count on one store.
Two `gateway serve` processes on a real Redis (tests/redis_server.py), and one `serve --workers 2` on one
SQLite file, each driven by the official SDK with requests sent at once and dealt between the processes:
a request limit lets exactly its amount through, a budget for exactly 50 requests serves 50 of 200 and
bills exactly the budget, two concurrency slots hold across processes. Killing Redis mid-run follows the
failure policy (limits in each process's memory, budgets 503) and the store is used again once it is back.
The in-process behaviour on the memory store is tests/test_limits.py and tests/test_budgets.py.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import httpx2
import openai
import pytest

from tests.conftest import BETA_KEY, DEMO_KEY, LOOPBACK_TLS, engine_config, sdk
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.metering_support import http_get, parse_metrics, wait_ledger
from tests.process import GatewayProcess
from tests.redis_server import RedisServer, needs_redis, redis_server

PRICED = "tts-1: {task: speech, routes: [{backend: speaches, model: kokoro}]"
TEN_CHARACTERS = "0123456789"
"""At $1,000 per million characters, one speech request of it costs exactly $0.01."""
Launch = Callable[..., list[GatewayProcess]]
T = TypeVar("T")


def table(engine: FakeOpenAIEngine, tmp_path: Path, state: str, key_rules: str = "", policy: str = "",
          ledger: Path | None = None) -> str:
    """The test table with tts-1 priced, no background probes (the engine's requests are counted), a backend
    timeout that 200 requests at once on a loaded machine stay within, `state`, `key_rules` on the demo key
    and `policy` appended."""
    text = engine_config(engine.url, tmp_path / "spool").replace(
        PRICED, PRICED + ", price: {per_million_characters: 1000}", 1).replace(
        "server:\n", "server:\n  probe_interval_s: 0\n", 1).replace("timeout_s: 2\n", "timeout_s: 30\n", 1)
    if key_rules:
        text = text.replace("tenant: acme, sha256:", f"tenant: acme, {key_rules}, sha256:", 1)
    text += f"state: {state}\n" + policy
    if ledger is not None:
        text += f"ledger: {{sink: file, path: {ledger}}}\n"
    return text


LOADED = {"timeout_s": "5"}
"""For the bursts of 100 requests a process: on a loaded 2-core CI machine a cold process's event loop can
lag past the store's 0.5 s default timeout, and the failure policy would then answer 503s that are not what
these tests are about (the failure path is the kill test's)."""


def on_redis(url: str, **extra: str) -> str:
    """A `state:` on Redis under a key prefix of its own (the test's counts start at zero)."""
    return "{" + ", ".join([f"backend: redis, url: '{url}', key_prefix: {uuid.uuid4().hex}",
                            *(f"{k}: {v}" for k, v in extra.items())]) + "}"


def on_sqlite(tmp_path: Path) -> str:
    return f"{{backend: sqlite, path: {tmp_path / 'state.sqlite3'}, timeout_s: {LOADED['timeout_s']}}}"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """Starts gateway processes, one per config text, at once (each takes about half a second)."""
    started: list[GatewayProcess] = []
    (tmp_path / "spool").mkdir()

    def run(*configs: str, workers: int = 1) -> list[GatewayProcess]:
        paths = []
        for text in configs:
            paths.append(tmp_path / f"gateway-{len(started) + len(paths)}.yaml")
            paths[-1].write_text(text)
        with ThreadPoolExecutor(len(paths)) as pool:
            processes = list(pool.map(lambda p: GatewayProcess(p, p.with_suffix(".log"), workers=workers), paths))
        started.extend(processes)
        return processes

    yield run
    for process in started:
        process.stop()


def clear_of_the_window(window_s: float = 60, margin_s: float = 3.0) -> None:
    """Start counting in a window with `margin_s` left, so that one window holds the whole run (one that
    turns mid-run lets a second limit's worth through). For a minute: waits out at most `margin_s`, in one
    run of twenty."""
    left = window_s - time.time() % window_s
    if left < margin_s:
        time.sleep(left + 0.05)


def access_log(process: GatewayProcess) -> list[dict[str, Any]]:
    """The access log lines the process has written whole (the last may be half-written)."""
    text = process.log()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.startswith("{")]


def worker_pids(process: GatewayProcess, request_ids: set[str], timeout: float = 5.0) -> dict[str, int]:
    """request id -> pid of the worker that answered it (a worker's access log lines carry its pid)."""
    deadline = time.monotonic() + timeout
    while True:
        found = {line["request_id"]: line["pid"] for line in access_log(process) if line["request_id"] in request_ids}
        if len(found) == len(request_ids):
            return found
        assert time.monotonic() < deadline, f"{len(request_ids) - len(found)} requests not in the access log"
        time.sleep(0.02)


async def connections(process: GatewayProcess, count: int) -> list[httpx2.AsyncClient]:
    """`count` clients of one open connection each to `process`, a tenth of them at least accepted by each
    of its workers. New connections to a `--workers` port go to whichever worker accepts first, on a busy
    machine often one for nearly all; then the other would count nothing, and counts kept per worker would
    pass as exact. So connections are opened in tens, kept where a worker still needs them, until both
    have their tenth."""
    least = max(1, count // 10) if process.workers > 1 else 0
    kept: dict[int, list[httpx2.AsyncClient]] = {pid: [] for pid in set(process.serving().values())} or {0: []}
    for _ in range(100):
        opened = {}
        for _ in range(10):
            http = openai.DefaultAsyncHttpxClient(verify=LOOPBACK_TLS, limits=httpx2.Limits(
                max_connections=1, keepalive_expiry=60))
            opened[rid := f"pin-{uuid.uuid4().hex}"] = http
            assert (await http.get(f"{process.url}/healthz", headers={"X-Request-ID": rid})).status_code == 200
        pids = worker_pids(process, set(opened)) if process.workers > 1 else dict.fromkeys(opened, 0)
        for rid, http in opened.items():
            mine = kept[pids[rid]]
            needed = sum(max(0, least - len(theirs)) for theirs in kept.values() if theirs is not mine)
            if len(mine) < least or sum(len(c) for c in kept.values()) + needed < count:
                mine.append(http)
            else:
                await http.aclose()
        if sum(len(c) for c in kept.values()) == count:
            return interleaved(list(kept.values()))
    raise AssertionError(f"connections not spread over the workers: {[len(c) for c in kept.values()]}")


def interleaved(groups: list[list[T]]) -> list[T]:
    """One of each group in turn, so that requests sent at once reach every process and worker from the start."""
    return [item for row in itertools.zip_longest(*groups) for item in row if item is not None]


def speak_at_once(processes: list[GatewayProcess], count: int, key: str = DEMO_KEY) -> list[Any]:
    """`count` speech requests through the official async SDK, dealt in turn over `processes` (and over the
    workers of each), each on a connection opened beforehand, so that all go out at once. Each one's raw
    response (headers readable) or its exception."""
    async def run() -> list[Any]:
        clients = interleaved([[openai.AsyncOpenAI(base_url=f"{process.url}/v1", api_key=key, max_retries=0,
                                                   timeout=30, http_client=http)
                                for http in await connections(process, count // len(processes))]
                               for process in processes])
        try:
            return await asyncio.gather(*(client.audio.speech.with_raw_response.create(
                model="tts-1", voice="nova", input=TEN_CHARACTERS, response_format="pcm") for client in clients),
                return_exceptions=True)
        finally:
            for client in clients:
                await client.close()

    return asyncio.run(run())


def metrics(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return parse_metrics(http_get(f"{url}/metrics")[2].decode())


def served_by(process: GatewayProcess, total: int, timeout: float = 5.0) -> dict[int, int]:
    """pid -> speech requests it answered, once `total` are in the access log."""
    deadline = time.monotonic() + timeout
    while True:
        served: dict[int, int] = {}
        for line in access_log(process):
            if line["endpoint"] == "/v1/audio/speech":
                served[line["pid"]] = served.get(line["pid"], 0) + 1
        if sum(served.values()) >= total or time.monotonic() > deadline:
            return served
        time.sleep(0.02)


def check_request_limit(results: list[Any], engine: FakeOpenAIEngine) -> None:
    """Of 30 requests under a limit of 10 per minute: exactly 10 served, each seeing its own count (remaining
    9 down to 0, as one counter hands them out), the rest OpenAI's 429 with its headers, before any backend."""
    served = [r for r in results if not isinstance(r, BaseException)]
    refusals = [r for r in results if isinstance(r, BaseException)]
    assert len(served) == 10, refusals[:1]
    assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in served) == list(range(10))
    assert all(isinstance(r, openai.RateLimitError) for r in refusals), refusals[:3]
    for error in refusals:
        assert isinstance(error, openai.RateLimitError)
        assert error.body == {"message": error.body["message"], "type": "requests", "param": None,
                              "code": "rate_limit_exceeded"}
        assert "requests per minute on key 'demo'" in error.message and "Limit 10, Used 10" in error.message
        headers = error.response.headers
        assert headers["x-ratelimit-limit-requests"] == "10" and headers["x-ratelimit-remaining-requests"] == "0"
        assert 1 <= int(headers["retry-after"]) <= 60 and 0 < int(headers["retry-after-ms"]) <= 60_000
    assert engine.calls("/v1/audio/speech") == 10


def check_budget(results: list[Any], engine: FakeOpenAIEngine, records: list[dict[str, Any]]) -> None:
    """Of 200 requests at $0.01 against $0.50 (after check_request_limit's 10): exactly 50 served and sent
    to the engine, the rest OpenAI's `insufficient_quota`, and the ledgers bill exactly the budget."""
    refusals = [r for r in results if isinstance(r, BaseException)]
    assert len(results) - len(refusals) == 50, [r for r in refusals if not isinstance(r, openai.RateLimitError)][:3]
    assert all(isinstance(r, openai.RateLimitError) and r.body["code"] == "insufficient_quota" for r in refusals), \
        refusals[:3]
    first = refusals[0]
    assert isinstance(first, openai.RateLimitError) and first.body["type"] == "insufficient_quota"
    assert "the 0.5 usd budget per month of tenant 'beta'" in first.message
    assert first.response.headers["x-should-retry"] == "false" and int(first.response.headers["retry-after"]) > 0
    assert engine.calls("/v1/audio/speech") == 10 + 50
    assert len(records) == 200
    assert round(sum(r["cost_usd"] or 0 for r in records if r["billable"]), 9) == 0.5
    assert sum(1 for r in records if r["billable"]) == 50
    assert {r["rejected_by"] for r in records if r["status"] == 429} == {"tenant:budget/month"}


def exact_config(engine: FakeOpenAIEngine, tmp_path: Path, state: str, ledger: Path) -> str:
    """10 requests a minute on the demo key (tenant acme), $0.50 a month for tenant beta (its key)."""
    return table(engine, tmp_path, state, "limits: [{requests: 10, per: minute}]",
                 "tenants: {beta: {budget: {usd: 0.5, period: month}}}\n", ledger)


def check_exact(processes: list[GatewayProcess], engine: FakeOpenAIEngine, ledgers: list[Path]) -> None:
    """On gateways of exact_config counting on one store: 30 requests at once on the demo key, dealt over
    `processes`, then 200 on the beta key (check_request_limit, check_budget)."""
    clear_of_the_window()
    check_request_limit(speak_at_once(processes, 30), engine)
    results = speak_at_once(processes, 200, key=BETA_KEY)
    records = [r for ledger in ledgers for r in wait_ledger(ledger, (30 + 200) // len(ledgers))]
    assert len(records) == 30 + 200  # each process (ledger) its share, every request once
    check_budget(results, engine, [r for r in records if r["tenant"] == "beta"])


@needs_redis
def test_two_processes_on_redis_let_exactly_the_request_limit_and_the_budget_through(
        launch: Launch, engine: FakeOpenAIEngine, tmp_path: Path, redis_url: str) -> None:
    state, ledgers = on_redis(redis_url, **LOADED), [tmp_path / "usage-a.jsonl", tmp_path / "usage-b.jsonl"]
    a, b = launch(*(exact_config(engine, tmp_path, state, ledger) for ledger in ledgers))
    check_exact([a, b], engine, ledgers)
    remaining = [metrics(p.url).get(("gateway_budget_remaining", frozenset({("tenant", "beta")}))) for p in (a, b)]
    assert min(r for r in remaining if r is not None) == pytest.approx(0, abs=1e-9)  # the last settle's reading


@needs_redis
def test_two_concurrency_slots_hold_across_two_processes(
        launch: Launch, engine: FakeOpenAIEngine, tmp_path: Path, redis_url: str) -> None:
    engine.chunk_size, engine.chunk_delay = 4096, 0.05  # a long input streams for seconds
    config = table(engine, tmp_path, on_redis(redis_url, **LOADED), "limits: [{concurrent: 2}]")
    a, b = launch(config, config)
    with sdk(f"{a.url}/v1") as on_a, sdk(f"{b.url}/v1") as on_b:
        with ExitStack() as streams:
            held = []  # the readers too: one dropped closes its stream
            for client in (on_a, on_b):  # one stream held open on each process
                stream = streams.enter_context(client.audio.speech.with_streaming_response.create(
                    model="tts-1", voice="nova", input="A stream held open. " * 10, response_format="pcm"))
                held.append(stream.iter_bytes(4096))
                assert next(held[-1])
            for client in (on_a, on_b):
                with pytest.raises(openai.RateLimitError) as refused:
                    client.audio.speech.create(model="tts-1", voice="nova", input="Hi.", response_format="pcm")
                assert "Too many concurrent requests on key 'demo': Limit 2" in refused.value.message
                assert refused.value.body["code"] == "rate_limit_exceeded"
        # both streams closed unread: each process frees its slot as its client goes away
        deadline = time.monotonic() + 5
        while True:
            try:
                on_b.audio.speech.create(model="tts-1", voice="nova", input="Hi.", response_format="pcm")
                break
            except openai.RateLimitError:
                assert time.monotonic() < deadline, "the slots did not come back"
                time.sleep(0.05)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of the test's own, to kill and start again."""
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis") as server:
        yield server


def fallbacks(url: str, feature: str, action: str) -> float | None:
    return metrics(url).get(("gateway_state_fallbacks_total", frozenset({("feature", feature), ("action", action)})))


@needs_redis
def test_killing_redis_mid_run_follows_the_failure_policy_and_the_store_is_used_again_when_back(
        launch: Launch, engine: FakeOpenAIEngine, tmp_path: Path, own_redis: RedisServer) -> None:
    config = table(engine, tmp_path, on_redis(own_redis.url, retry_s="0.2"), "limits: [{requests: 3, per: hour}]")
    a, b = launch(config.replace("tenant: beta,", "tenant: beta, budget: {usd: 1},", 1), config)
    clear_of_the_window(3600, margin_s=10)
    with sdk(f"{a.url}/v1") as demo_a, sdk(f"{b.url}/v1") as demo_b, sdk(f"{a.url}/v1", key=BETA_KEY) as beta:
        def speak(client: openai.OpenAI) -> str:
            return client.audio.speech.with_raw_response.create(
                model="tts-1", voice="nova", input="Counted.", response_format="pcm"
            ).headers["x-ratelimit-remaining-requests"]

        assert (speak(demo_a), speak(demo_b)) == ("2", "1")  # one count, in Redis
        beta.audio.speech.create(model="tts-1", voice="nova", input="Budgeted.")
        own_redis.kill()

        for client in (demo_a, demo_b):  # each process counts in its own memory, from zero
            assert [speak(client) for _ in range(3)] == ["2", "1", "0"]
            with pytest.raises(openai.RateLimitError) as limited:
                speak(client)
            assert "Limit 3, Used 3" in limited.value.message and limited.value.body["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.InternalServerError) as refused:
            beta.audio.speech.create(model="tts-1", voice="nova", input="No budget without the store.")
        assert refused.value.status_code == 503 and refused.value.body["code"] == "state_unavailable"
        assert refused.value.response.headers["retry-after"] == "1"
        assert "redis" not in refused.value.message.lower() and str(own_redis.port) not in refused.value.message
        assert engine.calls("/v1/audio/speech") == 2 + 1 + 6  # the refusals called no backend
        assert fallbacks(a.url, "limits", "memory") == fallbacks(b.url, "limits", "memory") == 4
        assert fallbacks(a.url, "budgets", "refused") == 1
        assert metrics(a.url)[("gateway_state_errors_total", frozenset({("op", "take")}))] >= 1

        own_redis.start()  # on its port, empty: counts from zero again
        time.sleep(0.25)  # state.retry_s
        assert speak(demo_a) == "2" and speak(demo_b) == "1", "memory would have refused: 3 of 3 counted there"
        beta.audio.speech.create(model="tts-1", voice="nova", input="Budgeted again.")
        assert fallbacks(a.url, "limits", "memory") == fallbacks(b.url, "limits", "memory") == 4
        assert fallbacks(a.url, "budgets", "refused") == 1
    assert "state store failed" in a.log()


def test_sqlite_with_two_workers_lets_exactly_the_request_limit_and_the_budget_through(
        launch: Launch, engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    ledger = tmp_path / "usage.jsonl"
    (gateway,) = launch(exact_config(engine, tmp_path, on_sqlite(tmp_path), ledger), workers=2)
    check_exact([gateway], engine, [ledger])
    served = served_by(gateway, 30 + 200)
    assert len(served) == 2 and min(served.values()) >= 3 + 20, served  # each worker answered its tenth
