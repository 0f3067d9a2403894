"""Admission control per backend (gateway/capacity.py, the loop in gateway/handlers/routing.py): over HTTP with
engine doubles that count the requests they run at once (`peak`) and answer 503 past `max_active`, so the
double itself asserts the limit, driven by the official SDK.

Order is made certain, never by sleeping: a request is sent once the one before it is visibly queued (the
gateway's own gateway_backend_queue_depth on /metrics) or running at the engine (`started`); a slot is
taken by a slow stream the test holds open (`held`) and freed by closing it, one slot at a time. Each
gateway counts its slots in a store of its own (`state:` memory, or SQLite in the test's directory): the
default SQLite file under var/ would be shared by every test gateway on the machine. Several processes
sharing one limit (SQLite under `serve --workers 2`, two gateways on one Redis) are the last tests. The
settings' parsing is tests/test_capacity_settings.py.
"""

from __future__ import annotations

import json
import logging
import socket
import textwrap
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest

from tests import test_shared_state
from tests.conftest import BETA_KEY, DEMO_KEY, ENGINE_KEY, Gateway, ServerThread, sdk, server_yaml
from tests.fakes.openai_engine import FakeOpenAIEngine, speech_seconds
from tests.metering_support import scrape, total
from tests.raw_http import request as raw_request
from tests.redis_server import needs_redis
from tests.support import WAV, assert_settled, expect_error, wait_for
from tests.test_shared_state import LOADED, Launch, on_redis, on_sqlite, served_by, speak_at_once
from tests.test_shared_state import table as shared_table

SPEECH = "/v1/audio/speech"
LONG = "A stream the test holds open while other requests queue behind it. " * 8
"""About 30 s of audio, 16 KiB every 0.1 s (`slow`): a stream that lasts until the test closes it."""
SHORT = "Hi."


def pcm_bytes(text: str) -> int:
    """What the doubles synthesize for `text` as 24 kHz 16-bit PCM, whole."""
    return int(24_000 * speech_seconds(text)) * 2


PCM_BYTES = pcm_bytes(SHORT)
launch, redis_url = test_shared_state.launch, test_shared_state.redis_url
"""Its fixtures: gateway processes started at once (stopped with the test), and the real Redis of the module."""


def config(tmp_path: Path, backends: dict[str, tuple[str, str]], routes: str = "", *, state: str = "memory",
           model: str = "", extra: str = "") -> str:
    """tts-1 and whisper-1 over `backends` (name -> (engine URL, its admission fields as YAML flow, e.g.
    "max_concurrency: 1")), in their order unless `routes` gives the routes' own fields; two keys (demo of
    tenant acme, beta of tenant beta); slots counted in `state`; no outlier ejection (failures here are
    about slots)."""
    if state == "sqlite":
        state = f"sqlite, path: {tmp_path / 'state.sqlite3'}"
    lines = [textwrap.dedent(server_yaml(tmp_path / "spool")).lstrip("\n"),
             f'  - {{name: beta, tenant: beta, key: "{BETA_KEY}"}}', "backends:"]
    for name, (url, fields) in backends.items():
        lines.append(f'  {name}: {{kind: openai, url: "{url}", api_key: "{ENGINE_KEY}", timeout_s: 2, '
                     f"connect_timeout_s: 1{', ' + fields if fields else ''}}}")
    route_list = routes or ", ".join(f"{{backend: {name}, model: m}}" for name in backends)
    lines += ["models:", f"  tts-1: {{task: speech, routes: [{route_list}]{model}}}",
              f"  whisper-1: {{task: transcription, routes: [{route_list}]}}",
              f"state: {{backend: {state}}}", "outlier: {enabled: false}", extra]
    return "\n".join(lines) + "\n"


def metric(gw: Gateway, name: str, **labels: str) -> float:
    _, samples = scrape(gw.url + "/metrics")
    return total(samples, name, **labels)


def depth(gw: Gateway, backend: str) -> float:
    return metric(gw, "gateway_backend_queue_depth", backend=backend)


def waited(gw: Gateway, backend: str, outcome: str) -> float:
    """Requests that left `backend`'s queue this way (admitted, timeout, left)."""
    return metric(gw, "gateway_backend_queue_wait_seconds_count", backend=backend, outcome=outcome)


def speak(c: openai.OpenAI, text: str = SHORT) -> bytes:
    return c.audio.speech.create(model="tts-1", voice="nova", input=text, response_format="pcm").content


def inputs(engine: FakeOpenAIEngine) -> list[str]:
    """The speech inputs the engine received, in order."""
    return [r.json["input"] for r in engine.requests if r.path == SPEECH]


@contextmanager
def held(c: openai.OpenAI, engine: FakeOpenAIEngine) -> Iterator[None]:
    """A slot taken by a slow stream on `engine` (its first bytes read), until the block ends: the client
    closes it unread, the gateway's handler is cancelled and frees the slot."""
    before = engine.started
    with c.audio.speech.with_streaming_response.create(model="tts-1", voice="nova", input=LONG,
                                                       response_format="pcm") as response:
        reader = response.iter_bytes(4096)  # kept: a reader dropped closes its stream
        assert next(reader)
        assert engine.started == before + 1, "the held stream went to another engine"
        yield


def queue(pool: ThreadPoolExecutor, gw: Gateway, backend: str, call: Callable[[], Any]) -> Future[Any]:
    """`call` in the background, returned once it waits in `backend`'s queue (its depth one more)."""
    before = depth(gw, backend)
    future = pool.submit(call)
    wait_for(lambda: depth(gw, backend) == before + 1 or future.done(), what=f"a request queued at {backend}")
    assert not future.done(), future.result()
    return future


@pytest.fixture
def slow(engine: FakeOpenAIEngine, second: FakeOpenAIEngine) -> tuple[FakeOpenAIEngine, FakeOpenAIEngine]:
    """Both doubles stream 16 KiB every 0.1 s: SHORT in two pieces 0.1 s apart, LONG for as long as it is
    held."""
    for e in (engine, second):
        e.chunk_size, e.chunk_delay = 16384, 0.1
    return engine, second


# -- the limit and the queue's order ----------------------------------------------------------------------


@pytest.mark.parametrize("state", ["memory", "sqlite"])
def test_k_plus_five_requests_never_exceed_k_at_the_engine_and_the_queued_run_in_arrival_order(
        servers: ServerThread, make_gateway: Callable[[str], Gateway], tmp_path: Path, slow: Any,
        engine: FakeOpenAIEngine, state: str) -> None:
    """K = 2. Two held streams take both slots; five requests queue, each sent once the one before is
    queued. One stream is closed: its slot passes down the queue one request at a time, in arrival order,
    the other slot still held. The double would answer a third request at once with a 503."""
    engine.max_active = 2
    gw = make_gateway(config(tmp_path, {"a": (engine.url, "max_concurrency: 2")}, state=state))
    with sdk(gw) as c, ThreadPoolExecutor(5) as pool, held(c, engine):
        with held(c, engine):
            queued = [queue(pool, gw, "a", lambda i=i: speak(c, f"Queued {i}.")) for i in range(5)]
            assert engine.started == 2 and depth(gw, "a") == 5
        assert [len(f.result(10)) for f in queued] == [pcm_bytes(f"Queued {i}.") for i in range(5)]
        assert inputs(engine) == [LONG, LONG] + [f"Queued {i}." for i in range(5)]
        assert engine.peak == 2 and engine.over_capacity == 0
    assert depth(gw, "a") == 0 and waited(gw, "a", "admitted") == 5
    assert_settled(servers, gw, engine)


def test_a_high_priority_request_goes_before_a_low_one_queued_earlier(
        make_gateway: Callable[[str], Gateway], tmp_path: Path, slow: Any, engine: FakeOpenAIEngine) -> None:
    """The demo key is `low` (its own queue_priority), the beta key `high` (its tenant's)."""
    text = config(tmp_path, {"a": (engine.url, "max_concurrency: 1")}, extra="tenants: {beta: {queue_priority: high}}")
    gw = make_gateway(text.replace("tenant: acme,", "tenant: acme, queue_priority: low,", 1))
    engine.max_active = 1
    with sdk(gw) as low, sdk(gw, key=BETA_KEY) as high, ThreadPoolExecutor(2) as pool:
        with held(low, engine):
            on_low = queue(pool, gw, "a", lambda: speak(low, "Low, queued first."))
            on_high = queue(pool, gw, "a", lambda: speak(high, "High, queued second."))
        assert on_low.result(10) and on_high.result(10)
    assert inputs(engine)[1:] == ["High, queued second.", "Low, queued first."]


@pytest.mark.parametrize("state", ["memory", "sqlite"])
def test_a_client_that_disconnects_while_queued_leaves_the_queue_at_once(
        servers: ServerThread, make_gateway: Callable[[str], Gateway], tmp_path: Path, slow: Any,
        engine: FakeOpenAIEngine, state: str) -> None:
    """queue_timeout_s is its default, 30 s: only the client's going away can take it out of the queue."""
    gw = make_gateway(config(tmp_path, {"a": (engine.url, "max_concurrency: 1")}, state=state))
    body = json.dumps({"model": "tts-1", "voice": "nova", "input": "Gone.", "response_format": "pcm"}).encode()
    with sdk(gw) as c:
        with held(c, engine):
            with socket.create_connection(("127.0.0.1", gw.port)) as sock:
                sock.sendall(raw_request("POST", SPEECH, {"Authorization": f"Bearer {DEMO_KEY}",
                                                          "Content-Type": "application/json"}, body))
                wait_for(lambda: depth(gw, "a") == 1, what="the raw request queued")
            wait_for(lambda: depth(gw, "a") == 0, what="the request to leave the queue as its client left")
            assert waited(gw, "a", "left") == 1 and waited(gw, "a", "admitted") == 0
        assert speak(c) and inputs(engine) == [LONG, SHORT]  # the slot came back; the one gone never ran
    assert_settled(servers, gw, engine)


# -- a full queue, a timed-out wait -----------------------------------------------------------------------


def test_a_full_queue_moves_on_to_the_next_route(make_gateway: Callable[[str], Gateway], tmp_path: Path,
                                                 slow: Any, engine: FakeOpenAIEngine,
                                                 second: FakeOpenAIEngine) -> None:
    """Both routes saturated (a free one would be tried first): the third request finds a's queue (of one)
    full and waits in b's instead, and b's slot, once freed, serves it."""
    gw = make_gateway(config(tmp_path, {"a": (engine.url, "max_concurrency: 1, max_queue: 1"),
                                        "b": (second.url, "max_concurrency: 1")}))
    with sdk(gw) as c, ThreadPoolExecutor(2) as pool, held(c, engine):
        with held(c, second):
            on_a = queue(pool, gw, "a", lambda: speak(c, "Waits at a."))
            on_b = queue(pool, gw, "b", lambda: speak(c, "Finds a full."))
            assert metric(gw, "gateway_backend_queue_full_total", backend="a") == 1
        assert len(on_b.result(10)) == pcm_bytes("Finds a full.")
        assert inputs(second) == [LONG, "Finds a full."] and inputs(engine) == [LONG]
    on_a.result(10)
    assert inputs(engine) == [LONG, "Waits at a."]
    assert metric(gw, "gateway_backend_retries_total", backend="a", reason="queue_full") == 1


def test_a_full_queue_on_the_last_route_is_a_429_the_sdk_reads_as_a_rate_limit(
        servers: ServerThread, make_gateway: Callable[[str], Gateway], tmp_path: Path, slow: Any,
        engine: FakeOpenAIEngine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "gateway.access")
    gw = make_gateway(config(tmp_path, {"a": (engine.url, "max_concurrency: 1, max_queue: 1")}))
    with sdk(gw) as c, ThreadPoolExecutor(1) as pool:
        with held(c, engine):
            waiting = queue(pool, gw, "a", lambda: speak(c, "Queued."))
            with pytest.raises(openai.RateLimitError) as refused:
                speak(c, "Refused.")
            assert depth(gw, "a") == 1
        waiting.result(10)
    expect_error(refused.value, 429, "requests", "rate_limit_exceeded", message="at capacity")
    assert refused.value.response.headers["retry-after"] == "1"
    assert inputs(engine) == [LONG, "Queued."]  # the refused one never reached the engine
    assert metric(gw, "gateway_backend_queue_full_total", backend="a") == 1
    assert_settled(servers, gw, engine)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    refused_line = next(line for line in lines if line["status"] == 429)  # names the model and the route that refused
    assert (refused_line["model"], refused_line["backend"]) == ("tts-1", "a")
    assert [(a["backend"], a["outcome"]) for a in refused_line["attempts"]] == [("a", "queue_full")]


def test_a_timed_out_wait_moves_on_to_the_next_route(make_gateway: Callable[[str], Gateway], tmp_path: Path,
                                                     slow: Any, engine: FakeOpenAIEngine,
                                                     second: FakeOpenAIEngine) -> None:
    gw = make_gateway(config(tmp_path, {"a": (engine.url, "max_concurrency: 1, queue_timeout_s: 0.2"),
                                        "b": (second.url, "max_concurrency: 1")}))
    with sdk(gw) as c, ThreadPoolExecutor(1) as pool, held(c, engine):
        with held(c, second):
            moved = pool.submit(speak, c, "Moves on.")
            wait_for(lambda: depth(gw, "b") == 1, what="the request in b's queue after a's timed out")
            assert waited(gw, "a", "timeout") == 1
        assert len(moved.result(10)) == pcm_bytes("Moves on.")
        assert inputs(second) == [LONG, "Moves on."] and inputs(engine) == [LONG]
    assert metric(gw, "gateway_backend_retries_total", backend="a", reason="queue_timeout") == 1


def test_a_timed_out_wait_on_the_last_route_is_a_503_with_retry_after(
        servers: ServerThread, make_gateway: Callable[[str], Gateway], tmp_path: Path, slow: Any,
        engine: FakeOpenAIEngine) -> None:
    gw = make_gateway(config(tmp_path, {"a": (engine.url, "max_concurrency: 1, queue_timeout_s: 0.2")}))
    with sdk(gw) as c, held(c, engine), pytest.raises(openai.InternalServerError) as refused:
        speak(c, "Times out.")
    expect_error(refused.value, 503, "server_error", "service_unavailable", message="currently overloaded")
    assert refused.value.response.headers["retry-after"] == "1"
    assert inputs(engine) == [LONG] and waited(gw, "a", "timeout") == 1 and depth(gw, "a") == 0
    assert_settled(servers, gw, engine)


# -- saturated routes are passed over, not waited for -----------------------------------------------------


@pytest.mark.parametrize(("routes", "balance"), [
    ("{backend: a, model: m, priority: 0}, {backend: b, model: m, priority: 1}", ""),
    ("{backend: a, model: m, weight: 2}, {backend: b, model: m}", ", balance: least_busy"),
], ids=["priority", "least_busy"])
def test_a_saturated_route_is_passed_over_without_waiting(make_gateway: Callable[[str], Gateway], tmp_path: Path,
                                                          slow: Any, engine: FakeOpenAIEngine,
                                                          second: FakeOpenAIEngine, routes: str,
                                                          balance: str) -> None:
    """a (priority 0, or the heavier under least_busy) is free for the held stream, then saturated: the
    next requests go to b at once, none waits in a's queue, a still streaming."""
    gw = make_gateway(config(tmp_path, {"a": (engine.url, "max_concurrency: 1"), "b": (second.url, "")}, routes,
                             model=balance))
    with sdk(gw) as c, held(c, engine):
        for _ in range(3):
            assert len(speak(c)) == PCM_BYTES
        assert inputs(second) == [SHORT] * 3 and engine.active == 1
    assert waited(gw, "a", "admitted") == waited(gw, "a", "timeout") == 0


# -- a slot's life: a whole stream; an attempt that failed; a retry; a transcription ----------------------


def test_a_slot_is_held_until_a_streams_last_byte(servers: ServerThread, make_gateway: Callable[[str], Gateway],
                                                  tmp_path: Path, slow: Any, engine: FakeOpenAIEngine) -> None:
    """Two streams on one slot, the first of 0.5 s (11 pieces 0.05 s apart): the second, queued while it
    streams, waits it out (the double, at max_active 1, would refuse it otherwise), and each arrives whole."""
    engine.max_active, engine.chunk_size, engine.chunk_delay = 1, 8192, 0.05
    first_text = "The first stream, a longer one."
    gw = make_gateway(config(tmp_path, {"a": (engine.url, "max_concurrency: 1")}))
    with sdk(gw) as c, ThreadPoolExecutor(2) as pool:
        first = pool.submit(speak, c, first_text)
        wait_for(lambda: engine.started == 1, what="the first stream at the engine")
        after = queue(pool, gw, "a", lambda: speak(c, SHORT))
        assert len(first.result(10)) == pcm_bytes(first_text) and len(after.result(10)) == PCM_BYTES
    assert engine.peak == 1 and engine.over_capacity == 0 and len(engine.finished) == 2
    assert waited(gw, "a", "admitted") == 1
    assert_settled(servers, gw, engine)


@pytest.mark.parametrize("mode", ["500", "hang", "drop_midstream"])
def test_a_failed_attempt_frees_its_slot(servers: ServerThread, make_gateway: Callable[[str], Gateway],
                                         tmp_path: Path, engine: FakeOpenAIEngine, mode: str) -> None:
    """One slot: after each failure (a 5xx, a read timeout, a stream cut after its first byte) the next
    request takes it at once; one leaked would make it wait 0.2 s and fail with a 503."""
    engine.mode, engine.chunk_size = mode, 8192
    text = config(tmp_path, {"a": (engine.url, "max_concurrency: 1, queue_timeout_s: 0.2")})
    gw = make_gateway(text.replace("timeout_s: 2,", "timeout_s: 0.3,"))
    with sdk(gw) as c:
        with pytest.raises((openai.APIStatusError, openai.APIConnectionError)):
            speak(c)
        engine.mode = "ok"
        assert len(speak(c)) == PCM_BYTES
    assert waited(gw, "a", "admitted") == waited(gw, "a", "timeout") == 0
    assert metric(gw, "gateway_backend_in_flight", backend="a") == 0
    assert_settled(servers, gw, engine)


def test_retried_and_failed_over_attempts_free_their_slots(
        servers: ServerThread, make_gateway: Callable[[str], Gateway], tmp_path: Path, engine: FakeOpenAIEngine,
        second: FakeOpenAIEngine, caplog: pytest.LogCaptureFixture) -> None:
    """One slot each at a and b, a wait of 0.2 s at most. Both fail (500): a, b, then each retried once, each
    attempt finding its slot free (one kept would turn the retry into a queue timeout, a 503). Then b
    recovers: three requests fail over from a to b, and nothing ever waited. The access log names every
    attempt."""
    caplog.set_level(logging.INFO, "gateway.access")
    engine.mode = second.mode = "500"
    gw = make_gateway(config(tmp_path, {"a": (engine.url, "max_concurrency: 1, queue_timeout_s: 0.2"),
                                        "b": (second.url, "max_concurrency: 1, queue_timeout_s: 0.2")},
                             model=", retry: {attempts: 2, backoff_s: 0.01}"))
    with sdk(gw) as c:
        with pytest.raises(openai.APIStatusError) as failed:
            speak(c, "Fails everywhere.")
        second.mode = "ok"
        for _ in range(3):
            assert len(speak(c)) == PCM_BYTES
    expect_error(failed.value, 502, "upstream_error", "bad_gateway")
    assert (engine.calls(SPEECH), second.calls(SPEECH)) == (2 + 3, 2 + 3)
    for backend in ("a", "b"):
        assert waited(gw, backend, "admitted") == waited(gw, backend, "timeout") == 0
        assert metric(gw, "gateway_backend_in_flight", backend=backend) == 0
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    tried = [[(a["backend"], a["outcome"]) for a in line["attempts"]] for line in lines if line["endpoint"] == SPEECH]
    assert tried[0][:2] == [("a", "backend_5xx"), ("b", "backend_5xx")]  # the retries: in their backoffs' order
    assert sorted(tried[0][2:]) == [("a", "backend_5xx"), ("b", "backend_5xx")]
    assert tried[1:] == [[("a", "backend_5xx"), ("b", "ok")]] * 3
    assert all(isinstance(a["ms"], float) and a["ms"] >= 0 for line in lines for a in line.get("attempts", []))
    assert_settled(servers, gw, engine, second)


def test_a_transcription_waits_for_the_slot_a_speech_stream_holds(
        servers: ServerThread, make_gateway: Callable[[str], Gateway], tmp_path: Path, slow: Any,
        engine: FakeOpenAIEngine) -> None:
    """Slots are the backend's, whatever the endpoint."""
    engine.max_active = 1
    gw = make_gateway(config(tmp_path, {"a": (engine.url, "max_concurrency: 1")}, state="sqlite"))
    with sdk(gw) as c, ThreadPoolExecutor(1) as pool:
        with held(c, engine):
            transcript = queue(pool, gw, "a", lambda: c.audio.transcriptions.create(
                model="whisper-1", file=("a.wav", WAV, "audio/wav"), response_format="text"))
            assert engine.calls("/v1/audio/transcriptions") == 0
        assert "quick brown fox" in transcript.result(10)
    assert engine.peak == 1 and engine.over_capacity == 0 and waited(gw, "a", "admitted") == 1
    assert_settled(servers, gw, engine)


# -- one limit shared by processes ------------------------------------------------------------------------

K = 3


def _shared(engine: FakeOpenAIEngine, tmp_path: Path, state: str) -> str:
    """tests/test_shared_state.py's table, its backend at max_concurrency K; the double streams each request
    (0.6 s of audio) in 8 pieces 0.05 s apart and answers 503 past K at once."""
    engine.chunk_size, engine.chunk_delay, engine.max_active = 4096, 0.05, K
    text = shared_table(engine, tmp_path, state)
    assert text.count("    connect_timeout_s: 1\n") == 1
    return text.replace("    connect_timeout_s: 1\n", f"    connect_timeout_s: 1\n    max_concurrency: {K}\n")


def _check_shared(results: list[Any], engine: FakeOpenAIEngine) -> None:
    """K + 3 requests sent at once, dealt between processes that would each let K through on their own:
    all served, never more than K at the engine."""
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert engine.calls(SPEECH) == K + 3
    assert engine.peak <= K and engine.over_capacity == 0, (engine.peak, engine.over_capacity)


def test_sqlite_holds_one_max_concurrency_over_two_workers(launch: Launch, engine: FakeOpenAIEngine,
                                                           tmp_path: Path) -> None:
    (gateway,) = launch(_shared(engine, tmp_path, on_sqlite(tmp_path)), workers=2)
    _check_shared(speak_at_once([gateway], K + 3), engine)
    assert len(served_by(gateway, K + 3)) == 2  # both workers answered


@needs_redis
def test_two_gateways_on_redis_hold_one_max_concurrency_together(launch: Launch, engine: FakeOpenAIEngine,
                                                                 tmp_path: Path, redis_url: str) -> None:
    text = _shared(engine, tmp_path, on_redis(redis_url, **LOADED))
    _check_shared(speak_at_once(launch(text, text), K + 3), engine)
