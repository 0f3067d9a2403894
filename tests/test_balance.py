"""Load balancing among a model's routes (gateway/balance.py): priority groups, weighted and least-busy order,
the in-flight count per backend and its gauge. The statistics over 1,000 draws test the ordering function
itself; the HTTP tests check that the gateway applies it (engine doubles that record every request)."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway.balance import LEAST_BUSY, ORDERED, WEIGHTED, order
from gateway.config import ConfigError, parse_config
from gateway.models import Route
from gateway.state import IN_FLIGHT
from gateway.table import Candidate
from tests.conftest import Gateway, ServerThread, sdk
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.metering_support import scrape, total
from tests.support import WAV, table_config, wait_for

pytestmark = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
SPEECH = "/v1/audio/speech"


def _gateway(make_gateway: Callable[[str], Gateway], tmp_path: Path, routes: dict[str, tuple[str, str]],
             balance: str = "") -> Gateway:
    """tts-1 over `routes`: backend name -> (engine URL, extra route fields such as "weight: 3")."""
    text = table_config({name: url for name, (url, _) in routes.items()},
                        {"tts-1": ("speech", [(name, "kokoro" + (f", {extra}" if extra else ""))
                                              for name, (_, extra) in routes.items()])}, tmp_path / "spool")
    if balance:
        text = text.replace("tts-1: {task: speech,", f"tts-1: {{task: speech, balance: {balance},")
    return make_gateway(text + "outlier: {enabled: false}\n")


def speech(c: openai.OpenAI, **kw: Any) -> bytes:
    return c.audio.speech.create(**{"model": "tts-1", "voice": "nova", "input": "Hi.",
                                    "response_format": "pcm", **kw}).content


def _candidates(*routes: Route) -> list[Candidate]:
    return [Candidate(r, None) for r in routes]  # type: ignore[arg-type]  # order() reads only the routes


def _names(candidates: list[Candidate]) -> list[str]:
    return [c.route.backend for c in candidates]


# -- the order, as a function ------------------------------------------------------------------------------

def test_weighted_order_over_1000_requests_matches_the_weights() -> None:
    """Weights 1:3, 1,000 draws: the second route comes first 750 times in expectation, sd = sqrt(1000 x 0.75 x
    0.25) = 13.7; the bound +-82 is 6 sd (fails about twice in a billion runs)."""
    candidates = _candidates(Route("a", "m", weight=1), Route("b", "m", weight=3))
    firsts = Counter(order(candidates, WEIGHTED, {})[0].route.backend for _ in range(1000))
    assert 750 - 82 <= firsts["b"] <= 750 + 82, firsts
    # Then the next among the rest by weight: of a:1, b:1, c:2, c first (1/2) then a or b (1/2 each);
    # a first (1/4) then b among b:1, c:2 (1/3): 1/12.
    three = _candidates(Route("a", "m"), Route("b", "m"), Route("c", "m", weight=2))
    orders = Counter(tuple(_names(order(three, WEIGHTED, {}))) for _ in range(1000))
    assert 250 - 82 <= orders[("c", "a", "b")] <= 250 + 82, orders  # sd 13.7 again
    assert 83 - 52 <= orders[("a", "b", "c")] <= 83 + 52, orders  # 1000/12; sd 8.7, 6 sd
    assert 167 - 71 <= orders[("a", "c", "b")] <= 167 + 71, orders  # 1000/6; sd 11.8, 6 sd


def test_a_lower_priority_comes_only_after_every_route_above() -> None:
    candidates = _candidates(Route("low", "m", priority=1, weight=1000), Route("a", "m", weight=0.001),
                             Route("b", "m", priority=0))
    for balance in (WEIGHTED, LEAST_BUSY, ORDERED):
        for _ in range(200):
            assert _names(order(candidates, balance, {"a": 5, "b": 9}))[-1] == "low"
    assert _names(order(candidates, ORDERED, {})) == ["a", "b", "low"]  # within a group: the YAML order


def test_least_busy_orders_by_in_flight_then_weight_then_at_random() -> None:
    candidates = _candidates(Route("a", "m"), Route("b", "m", weight=2), Route("c", "m"))
    assert _names(order(candidates, LEAST_BUSY, {"b": 3, "a": 1})) == ["c", "a", "b"]
    assert _names(order(candidates, LEAST_BUSY, {}))[0] == "b"  # a tie: the heavier first
    seconds = Counter(_names(order(candidates, LEAST_BUSY, {}))[1] for _ in range(200))
    assert set(seconds) == {"a", "c"}  # equal weight and load: at random (each missed with p = 2^-200)


def test_existing_configs_keep_their_yaml_order() -> None:
    config = parse_config(BASE % "")
    model = config.models["m"]
    assert model.balance == ORDERED
    assert model.routes == (Route("one", "m", 0, 1.0), Route("two", "m", 0, 1.0))
    rng = random.Random(1)
    assert all(_names(order(_candidates(*model.routes), model.balance, {"one": 9}, rng)) == ["one", "two"]
               for _ in range(50))
    assert parse_config(BASE % ", weight: 2").models["m"].balance == WEIGHTED  # any weight or priority
    assert parse_config(BASE % ", priority: 1").models["m"].balance == WEIGHTED
    assert parse_config(BASE % "").models["m"].routes[0].priority == 0
    assert parse_config((BASE % ", weight: 2").replace("task: speech,", "task: speech, balance: ordered,")) \
        .models["m"].balance == ORDERED


# -- over HTTP ---------------------------------------------------------------------------------------------

def test_weighted_requests_reach_both_backends_by_their_weights(
        make_gateway: Callable[[str], Gateway], tmp_path: Path, engine: FakeOpenAIEngine,
        second: FakeOpenAIEngine) -> None:
    """100 requests at 1:3: the first gets 25 in expectation (sd 4.3); 5..45 is 4.6 sd (about 4 in a million)."""
    gw = _gateway(make_gateway, tmp_path, {"first": (engine.url, "weight: 1"), "second": (second.url, "weight: 3")})
    with sdk(gw) as c:
        for _ in range(100):
            speech(c)
    assert engine.calls(SPEECH) + second.calls(SPEECH) == 100
    assert 5 <= engine.calls(SPEECH) <= 45, (engine.calls(SPEECH), second.calls(SPEECH))


def test_least_busy_sends_to_the_idle_backend_and_the_gauge_counts_streams(
        servers: ServerThread, make_gateway: Callable[[str], Gateway], tmp_path: Path, engine: FakeOpenAIEngine,
        second: FakeOpenAIEngine) -> None:
    engine.chunk_delay, engine.chunk_size = 0.05, 8192  # the held stream: a second or so
    gw = _gateway(make_gateway, tmp_path, {"first": (engine.url, "weight: 2"), "second": (second.url, "")},
                  balance="least_busy")

    def gauge() -> dict[str, float]:
        _, samples = scrape(gw.url + "/metrics")
        return {b: total(samples, "gateway_backend_in_flight", backend=b) for b in ("first", "second")}

    long_input = "Long enough to stream for a while, in several chunks."
    with sdk(gw) as c:
        with c.audio.speech.with_streaming_response.create(model="tts-1", voice="nova", input=long_input,
                                                           response_format="pcm") as response:
            chunks = response.iter_bytes(2048)
            next(chunks)  # a tie at 0 in flight: the heavier `first` took it, and streams
            assert engine.calls(SPEECH) == 1
            assert gauge() == {"first": 1, "second": 0}  # after the first byte, still in flight
            for _ in range(5):
                speech(c)  # `first` is busy: `second`, although lighter
            assert (engine.calls(SPEECH), second.calls(SPEECH)) == (1, 5)
            b"".join(chunks)
        wait_for(lambda: gauge() == {"first": 0, "second": 0}, what="the gauge back to 0")
        assert servers.call(lambda: dict(gw.app[IN_FLIGHT].counts)) == {}
        speech(c)  # idle again: the tie goes to the heavier
    assert (engine.calls(SPEECH), second.calls(SPEECH)) == (2, 5)


def test_transcriptions_count_in_flight_and_end_at_zero(
        servers: ServerThread, make_gateway: Callable[[str], Gateway], tmp_path: Path,
        engine: FakeOpenAIEngine) -> None:
    gw = make_gateway(table_config({"first": engine.url}, {"whisper-1": ("transcription", [("first", "whisper")])},
                                   tmp_path / "spool"))
    with sdk(gw) as c:
        assert c.audio.transcriptions.create(model="whisper-1", file=("a.wav", WAV, "audio/wav")).text
        events = list(c.audio.transcriptions.create(model="whisper-1", file=("a.wav", WAV, "audio/wav"),
                                                    stream=True))
        assert events[-1].type == "transcript.text.done"
    wait_for(lambda: servers.call(lambda: dict(gw.app[IN_FLIGHT].counts)) == {}, what="no attempt left in flight")
    _, samples = scrape(gw.url + "/metrics")
    assert samples[("gateway_backend_in_flight", frozenset({("backend", "first")}))] == 0  # counted, then ended


def test_a_lower_priority_serves_only_when_the_group_above_is_down(
        servers: ServerThread, make_gateway: Callable[[str], Gateway], tmp_path: Path, engine: FakeOpenAIEngine,
        second: FakeOpenAIEngine, third: FakeOpenAIEngine) -> None:
    gw = _gateway(make_gateway, tmp_path, {"first": (engine.url, "priority: 0"), "second": (second.url, "priority: 0"),
                                           "spare": (third.url, "priority: 1")})
    with sdk(gw, max_retries=0) as c:
        for _ in range(20):
            speech(c)
        assert third.calls(SPEECH) == 0 and engine.calls(SPEECH) > 0 and second.calls(SPEECH) > 0
        engine.mode = "500"
        for _ in range(5):
            speech(c)
        assert third.calls(SPEECH) == 0  # one of the group is up
        second.mode = "500"
        for _ in range(3):
            speech(c)
        assert third.calls(SPEECH) == 3
    assert servers.call(lambda: dict(gw.app[IN_FLIGHT].counts)) == {}  # failed attempts ended too


def test_routes_without_priority_or_weight_fail_over_in_yaml_order(
        make_gateway: Callable[[str], Gateway], tmp_path: Path, engine: FakeOpenAIEngine,
        second: FakeOpenAIEngine) -> None:
    gw = _gateway(make_gateway, tmp_path, {"first": (engine.url, ""), "second": (second.url, "")})
    with sdk(gw) as c:
        for _ in range(10):
            speech(c)
    assert (engine.calls(SPEECH), second.calls(SPEECH)) == (10, 0)


# -- config ------------------------------------------------------------------------------------------------

BASE = """
keys: [{name: a, key: k}]
backends:
  one: {kind: openai, url: "http://127.0.0.1:1/v1"}
  two: {kind: openai, url: "http://127.0.0.1:2/v1"}
models:
  m: {task: speech, routes: [{backend: one%s}, {backend: two}]}
"""


@pytest.mark.parametrize(("fields", "problem"), [
    (", weight: 0", "models.m.routes[0].weight: expected a number >= 0.001"),
    (", weight: -1", "models.m.routes[0].weight: expected a number >= 0.001"),
    (", weight: .nan", "models.m.routes[0].weight: expected a number >= 0.001"),
    (", weight: .inf", "models.m.routes[0].weight: expected a number >= 0.001"),
    (", weight: 1e12", "models.m.routes[0].weight: expected a number from 0.001 to 1000000"),
    (", weight: true", "models.m.routes[0].weight: expected a number >= 0.001"),
    (", weight: heavy", "models.m.routes[0].weight: expected a number >= 0.001"),
    (", weight: [1]", "models.m.routes[0].weight: expected a number >= 0.001"),
    (", priority: -1", "models.m.routes[0].priority: expected an integer from 0 (tried first) to 1000"),
    (", priority: 1001", "models.m.routes[0].priority: expected an integer from 0"),
    (", priority: 1e300", "models.m.routes[0].priority: expected an integer from 0"),
    (", priority: 1.5", "models.m.routes[0].priority: expected an integer from 0"),
    (", priority: .nan", "models.m.routes[0].priority: expected an integer from 0"),
    (", priority: true", "models.m.routes[0].priority: expected an integer from 0"),
    (", priority: high", "models.m.routes[0].priority: expected an integer from 0"),
    ("balance: random", "models.m.balance: expected one of weighted, least_busy, ordered"),
    ("balance: 5", "models.m.balance: expected one of weighted, least_busy, ordered"),
    ("balance: [weighted]", "models.m.balance: expected a string"),
    (", wieght: 3", "models.m.routes[0].wieght: unknown setting (a route has backend, model, priority, weight)"),
])
def test_hostile_values_are_refused_by_path(fields: str, problem: str) -> None:
    """`fields` go into the first route, or, for `balance:`, into the model."""
    text = (BASE % "").replace("task: speech,", f"task: speech, {fields},") if fields.startswith("balance") \
        else BASE % fields
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems
