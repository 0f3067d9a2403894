"""Retries before the first byte (gateway/retry.py, the loop in gateway/handlers/routing.py), over HTTP with
engine doubles through the official SDK: another route first, then the same route after a jittered exponential
backoff or the backend's short Retry-After, within `budget_s`; a backend's 429 tries elsewhere without counting
against it; what no retry fixes is tried once and says `x-should-retry: false`; a retried request is billed once;
nothing is retried after the first byte; each move-on is counted and each attempt logged. Then the parsing of
`models.<m>.retry`.

Backoffs here are 0.01-0.05 s. The waits the gateway plans are read from its routing log (`it may be retried in
x s`) and checked by range and ratio; the engine doubles' arrival times (`Recorded.arrived`) are checked only
against lower bounds (the planned waits), which a loaded machine can only exceed; never against an upper
wall-clock bound.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import openai
import pytest

from gateway.config import ConfigError, parse_config
from gateway.retry import Retry
from gateway.state import EJECTIONS, IN_FLIGHT
from tests.conftest import DEMO_KEY, LOOPBACK_TLS, Gateway, ServerThread, sdk
from tests.fakes.engine import Recorded
from tests.fakes.openai_engine import RATE, FakeOpenAIEngine, speech_seconds
from tests.metering_support import scrape, scrape_settled, total, wait_ledger
from tests.support import WAV, assert_settled, expect_error, quick_timeouts, table_config, wait_for

SPEECH = "/v1/audio/speech"
TRANSCRIBE = "/v1/audio/transcriptions"
TEXT = "Hello."
PCM_BYTES = int(RATE * speech_seconds(TEXT)) * 2
"""What the doubles synthesize for TEXT as 24 kHz 16-bit PCM, whole."""
NO_EJECTION = "outlier: {enabled: false}\n"
"""Retries alone: no failure here ejects a backend (unless a test is about ejection)."""
EJECT_AT_ONCE = "outlier: {consecutive_failures: 1, base_ejection_s: 30, max_ejected_percent: 100}\n"
"""One failure ejects a backend: an attempt wrongly counted as failed would show at once."""
AUTH = {"Authorization": f"Bearer {DEMO_KEY}"}
PRICE = "price: {per_million_characters: 15.0, per_audio_minute: 0.6}"


def _gateway(make_gateway: Callable[[str], Gateway], tmp_path: Path, urls: dict[str, str], retry: str = "", *,
             task: str = "speech", extra: str = NO_EJECTION, model_extra: str = "") -> Gateway:
    """tts-1 (or whisper-1) over `urls` (backend name -> engine URL), in that order, with `retry` as the body
    of `models.<m>.retry`."""
    model, native = ("tts-1", "kokoro") if task == "speech" else ("whisper-1", "whisper")
    text = table_config(urls, {model: (task, [(name, native) for name in urls])}, tmp_path / "spool")
    settings = (f" retry: {{{retry}}}," if retry else "") + (f" {model_extra}," if model_extra else "")
    assert f"{model}: {{task: {task}," in text
    return make_gateway(text.replace(f"{model}: {{task: {task},", f"{model}: {{task: {task},{settings}") + extra)


def _speak(c: openai.OpenAI, **kw: Any) -> bytes:
    return c.audio.speech.create(model="tts-1", voice="nova", input=TEXT, response_format="pcm", **kw).content


def _transcribe(c: openai.OpenAI) -> str:
    return c.audio.transcriptions.create(model="whisper-1", file=("a.wav", WAV, "audio/wav"),
                                         response_format="text").strip()


def _calls(*engines: FakeOpenAIEngine) -> list[tuple[str, Recorded]]:
    """Every request the engines received, by arrival: (which engine, by its index as "0", "1"..., the request)."""
    return sorted(((str(n), r) for n, e in enumerate(engines) for r in e.requests), key=lambda x: x[1].arrived)


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The access log's lines for speech requests (not /metrics scrapes)."""
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    return [line for line in lines if line["endpoint"] == SPEECH]


def _planned(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The retry waits the gateway planned, in order, as its routing log says them (to 3 significant digits)."""
    found = (_PLANNED.search(r.getMessage()) for r in caplog.records if r.name == "gateway.routing")
    return [float(m.group(1)) for m in found if m]


_PLANNED = re.compile(r"failed \([a-z_0-9]+\); it may be retried in ([0-9.e-]+) s")


def _retries(gw: Gateway) -> dict[tuple[str, str], float]:
    """gateway_backend_retries_total by (backend, reason)."""
    _, samples = scrape(gw.url + "/metrics")
    return {(dict(labels)["backend"], dict(labels)["reason"]): v for (name, labels), v in samples.items()
            if name == "gateway_backend_retries_total"}


# -- another route first, then the same one after a backoff -------------------------------------------------


def test_a_failed_route_is_tried_once_when_another_answers(make_gateway: Callable[[str], Gateway], tmp_path: Path,
                                                            engine: FakeOpenAIEngine,
                                                            second: FakeOpenAIEngine) -> None:
    """Route a fails (500), route b answers: one attempt each, b's transcript; a is not tried again, though
    retries are on."""
    engine.transcript_text, second.transcript_text = "From a.", "From b."
    engine.mode = "500"
    gw = _gateway(make_gateway, tmp_path, {"a": engine.url, "b": second.url}, "attempts: 3, backoff_s: 0.01",
                  task="transcription")
    with sdk(gw) as c:
        assert _transcribe(c) == "From b."
    assert (engine.calls(TRANSCRIBE), second.calls(TRANSCRIBE)) == (1, 1)
    assert [who for who, _ in _calls(engine, second)] == ["0", "1"]


def test_both_routes_fail_then_the_first_is_retried_after_the_second_after_a_backoff(
        make_gateway: Callable[[str], Gateway], tmp_path: Path, engine: FakeOpenAIEngine,
        second: FakeOpenAIEngine) -> None:
    """attempts: 2. a fails once (500) then recovers; b fails every time: a, b, then the retries, each due a
    jittered backoff after its route failed, in the order they fall due: a (which answers) or b first (it fails
    again, then a answers). Either way a is tried again only after b had its turn, and at least half the backoff
    after its own failure."""
    engine.transcript_text, second.transcript_text = "From a.", "From b."
    engine.mode, engine.fail_next, second.mode = "500", 1, "500"
    gw = _gateway(make_gateway, tmp_path, {"a": engine.url, "b": second.url}, "attempts: 2, backoff_s: 0.05",
                  task="transcription")
    with sdk(gw) as c:
        assert _transcribe(c) == "From a."
    calls = _calls(engine, second)
    assert [who for who, _ in calls] in (["0", "1", "0"], ["0", "1", "1", "0"])
    assert calls[-1][1].arrived - calls[0][1].arrived >= 0.05 / 2


def test_without_retries_each_route_is_tried_once(make_gateway: Callable[[str], Gateway], tmp_path: Path,
                                                  engine: FakeOpenAIEngine, second: FakeOpenAIEngine) -> None:
    """The default (attempts: 1): failover only; the last route's failure is the client's."""
    engine.mode = second.mode = "500"
    gw = _gateway(make_gateway, tmp_path, {"a": engine.url, "b": second.url})
    with sdk(gw) as c, pytest.raises(openai.InternalServerError) as caught:
        _speak(c)
    assert caught.value.status_code == 502
    assert (engine.calls(SPEECH), second.calls(SPEECH)) == (1, 1)


def test_a_backend_its_own_failure_ejected_is_not_retried(make_gateway: Callable[[str], Gateway], tmp_path: Path,
                                                         engine: FakeOpenAIEngine) -> None:
    """attempts: 3 on the only route, and one failure ejects: the retry would hit a backend known to be
    failing, so there is none (without the ejection there would be three calls, as the next test shows)."""
    engine.mode = "500"
    gw = _gateway(make_gateway, tmp_path, {"a": engine.url}, "attempts: 3, backoff_s: 0.01", extra=EJECT_AT_ONCE)
    with sdk(gw, max_retries=0) as c, pytest.raises(openai.InternalServerError):
        _speak(c)
    assert engine.calls(SPEECH) == 1


# -- the same route: jittered exponential backoff -------------------------------------------------------------


def test_the_same_route_is_retried_with_a_growing_jittered_backoff(make_gateway: Callable[[str], Gateway],
                                                                   tmp_path: Path, engine: FakeOpenAIEngine,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """One route failing twice, then answering; attempts: 3, backoff_s b = 0.03: three engine calls, the whole
    audio, on each of four requests. The waits the gateway planned (its warning says each) are a uniform draw
    between half and all of b, then of 2b, and differ from request to request (jitter); the gaps between the
    engine's calls are at least those waits (a loaded machine only adds to them, so their growth is judged on
    the plan). Over the four requests the second waits sum to about twice the first (the bound 1.15 fails once in
    about 300,000 runs of the jitter)."""
    b = 0.03
    caplog.set_level(logging.WARNING, logger="gateway.routing")
    gw = _gateway(make_gateway, tmp_path, {"only": engine.url}, f"attempts: 3, backoff_s: {b}, max_backoff_s: 1")
    gaps: list[tuple[float, float]] = []
    with sdk(gw) as c:
        for _ in range(4):
            engine.requests.clear()
            engine.mode, engine.fail_next = "500", 2
            assert len(_speak(c)) == PCM_BYTES
            assert len(engine.requests) == 3
            first, second, third = (r.arrived for r in engine.requests)
            gaps.append((second - first, third - second))
    delays = _planned(caplog)
    assert len(delays) == 8, delays
    firsts, seconds = delays[0::2], delays[1::2]
    assert all(b / 2 * 0.99 <= d <= b * 1.01 for d in firsts), delays  # logged to 3 significant digits
    assert all(b * 0.99 <= d <= 2 * b * 1.01 for d in seconds), delays
    assert len(set(firsts)) > 1 and len(set(seconds)) > 1, delays  # jittered
    assert sum(seconds) / sum(firsts) >= 1.15, delays
    assert all(g1 >= d1 * 0.99 and g2 >= d2 * 0.99 for (g1, g2), d1, d2 in zip(gaps, firsts, seconds, strict=True))


def test_attempts_count_every_try_of_a_route(make_gateway: Callable[[str], Gateway], tmp_path: Path,
                                             engine: FakeOpenAIEngine) -> None:
    """attempts: 3 is three tries in all (two retries), then the failure is the client's."""
    engine.mode = "500"
    gw = _gateway(make_gateway, tmp_path, {"only": engine.url}, "attempts: 3, backoff_s: 0.01")
    with sdk(gw) as c, pytest.raises(openai.InternalServerError) as caught:
        _speak(c)
    expect_error(caught.value, 502, "upstream_error", "bad_gateway")
    assert engine.calls(SPEECH) == 3


def test_the_backoff_is_capped_by_max_backoff_s(make_gateway: Callable[[str], Gateway], tmp_path: Path,
                                                engine: FakeOpenAIEngine, caplog: pytest.LogCaptureFixture) -> None:
    """backoff_s 0.01 capped at 0.015: six attempts, five waits. Uncapped the fifth would be 80-160 ms; capped,
    each after the first is a draw between half and all of 15 ms, and the gateway does wait that long."""
    engine.mode = "500"
    caplog.set_level(logging.WARNING, logger="gateway.routing")
    gw = _gateway(make_gateway, tmp_path, {"only": engine.url}, "attempts: 6, backoff_s: 0.01, max_backoff_s: 0.015")
    with sdk(gw) as c, pytest.raises(openai.InternalServerError):
        _speak(c)
    delays = _planned(caplog)
    assert len(delays) == 5 and engine.calls(SPEECH) == 6, delays
    assert 0.005 * 0.99 <= delays[0] <= 0.01 * 1.01, delays
    assert all(0.0075 * 0.99 <= d <= 0.015 * 1.01 for d in delays[1:]), delays
    gaps = [b - a for a, b in itertools.pairwise(r.arrived for r in engine.requests)]
    assert all(g >= d * 0.99 for g, d in zip(gaps, delays, strict=True)), (gaps, delays)


# -- Retry-After ------------------------------------------------------------------------------------------------


def test_a_short_retry_after_is_waited_for(make_gateway: Callable[[str], Gateway], tmp_path: Path,
                                           engine: FakeOpenAIEngine) -> None:
    """The backend's 429 says Retry-After: 1, within retry_after_max_s (2): the retry waits at least 1 s
    (not the 0.01 s backoff), then answers. The one test here that costs a second."""
    engine.mode, engine.fail_next, engine.retry_after = "429", 1, "1"
    gw = _gateway(make_gateway, tmp_path, {"only": engine.url},
                  "attempts: 2, backoff_s: 0.01, retry_after_max_s: 2")
    with sdk(gw) as c:
        assert len(_speak(c)) == PCM_BYTES
    first, second = (r.arrived for r in engine.requests)
    assert second - first >= 1.0


def test_a_retry_after_past_retry_after_max_s_is_not_waited_for(make_gateway: Callable[[str], Gateway],
                                                                tmp_path: Path, engine: FakeOpenAIEngine) -> None:
    """Retry-After: 1 with retry_after_max_s: 0.5: that route is not retried; its 429 (and its Retry-After)
    reaches the client, which may decide to wait."""
    engine.mode, engine.retry_after = "429", "1"
    gw = _gateway(make_gateway, tmp_path, {"only": engine.url},
                  "attempts: 3, backoff_s: 0.01, retry_after_max_s: 0.5")
    with sdk(gw) as c, pytest.raises(openai.RateLimitError) as caught:
        _speak(c)
    assert caught.value.status_code == 429
    assert caught.value.response.headers["Retry-After"] == "1"
    assert "x-should-retry" not in caught.value.response.headers  # the SDK may retry it, after its Retry-After
    assert engine.calls(SPEECH) == 1


# -- the budget -------------------------------------------------------------------------------------------------


def test_no_retry_starts_once_the_budget_is_spent(servers: ServerThread, make_gateway: Callable[[str], Gateway],
                                                  tmp_path: Path, engine: FakeOpenAIEngine) -> None:
    """The engine hangs; its timeout_s is 0.1 s, attempts 10, backoff 0.01, budget_s 0.25. Each attempt lasts at
    least its 0.1 s timeout, so at most three can start within the budget (at 0, >= 0.1, >= 0.2 s), and the
    first fails well within it: two or three attempts, then the timeout is the client's. Without the budget
    there would be ten."""
    engine.mode = "hang"
    text = table_config({"only": engine.url}, {"tts-1": ("speech", [("only", "kokoro")])}, tmp_path / "spool")
    text = quick_timeouts(text, 0.1).replace(
        "tts-1: {task: speech,", "tts-1: {task: speech, retry: {attempts: 10, backoff_s: 0.01, budget_s: 0.25},")
    gw = make_gateway(text + NO_EJECTION)
    with sdk(gw) as c, pytest.raises(openai.APIStatusError) as caught:
        _speak(c)
    expect_error(caught.value, 504, "upstream_error", "upstream_timeout")
    assert 2 <= engine.started <= 3, engine.started
    wait_for(lambda: engine.active == 0, what="the hanging attempts to be cancelled")
    assert_settled(servers, gw, engine)


async def test_a_client_that_leaves_during_a_backoff_gets_no_more_attempts(
        servers: ServerThread, make_gateway: Callable[[str], Gateway], tmp_path: Path, engine: FakeOpenAIEngine,
        caplog: pytest.LogCaptureFixture) -> None:
    """The engine fails; the gateway plans a retry 0.5-1 s later, and the client leaves meanwhile: the request
    ends there (499, one attempt logged), no retry reaches the engine, nothing is left held. (Waits only as
    long as the cancellation takes; a gateway that kept retrying would fail it after about a second.)"""
    engine.mode = "500"
    caplog.set_level(logging.INFO, logger="gateway")
    gw = _gateway(make_gateway, tmp_path, {"only": engine.url}, "attempts: 3, backoff_s: 1, max_backoff_s: 1")
    body = {"model": "tts-1", "voice": "nova", "input": TEXT, "response_format": "pcm"}
    async with aiohttp.ClientSession() as session:
        task = asyncio.ensure_future(session.post(gw.base_url + "/audio/speech", json=body, headers=AUTH))
        planned = "failed (backend_5xx); it may be retried in"
        await asyncio.to_thread(wait_for, lambda: any(planned in r.getMessage() for r in caplog.records),
                                2.0, "the retry to be planned")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await asyncio.to_thread(wait_for, lambda: bool(_access_lines(caplog)), 3.0, "the access log line")
    [line] = _access_lines(caplog)
    assert line["status"] == 499
    assert [(a["backend"], a["outcome"]) for a in line["attempts"]] == [("only", "backend_5xx")]
    assert engine.started == 1
    await asyncio.to_thread(assert_settled, servers, gw, engine)
    assert servers.call(lambda: dict(gw.app[IN_FLIGHT].counts)) == {}


# -- a backend's 429 ----------------------------------------------------------------------------------------------


def test_a_backends_429_tries_elsewhere_and_does_not_eject_it(servers: ServerThread,
                                                              make_gateway: Callable[[str], Gateway], tmp_path: Path,
                                                              engine: FakeOpenAIEngine,
                                                              second: FakeOpenAIEngine) -> None:
    """Route a answers 429 once: the request goes to b at once (no wait for a's Retry-After: 7, retries
    being off). One failure would eject a backend here, and a is not ejected: busy is not broken. The next
    request goes to a, which answers."""
    engine.transcript_text, second.transcript_text = "From a.", "From b."
    engine.mode, engine.fail_next = "429", 1
    gw = _gateway(make_gateway, tmp_path, {"a": engine.url, "b": second.url}, task="transcription",
                  extra=EJECT_AT_ONCE)
    with sdk(gw) as c:
        assert _transcribe(c) == "From b."
        assert servers.call(lambda: gw.app[EJECTIONS].ejected()) == {"a": None, "b": None}
        assert _transcribe(c) == "From a."
    assert (engine.calls(TRANSCRIBE), second.calls(TRANSCRIBE)) == (2, 1)


# -- what no retry fixes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["backend_auth", "backend_not_found"])
def test_what_no_retry_fixes_is_tried_once_and_says_so(make_gateway: Callable[[str], Gateway], tmp_path: Path,
                                                       engine: FakeOpenAIEngine, failure: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A refused credential (the engine wants another key) or a missing path (404): with attempts: 3 the route
    is tried once; the 502 says `x-should-retry: false`, so the SDK, allowed two retries, sends one request."""
    url = engine.url
    if failure == "backend_auth":
        engine.expected_api_key = "not-the-gateways-key"
    else:
        url += "/missing"
    gw = _gateway(make_gateway, tmp_path, {"only": url}, "attempts: 3, backoff_s: 0.01")
    sent: list[str] = []
    http = httpx2.Client(verify=LOOPBACK_TLS, event_hooks={"request": [lambda r: sent.append(r.url.path)]})
    caplog.set_level(logging.INFO, logger="gateway.access")
    with sdk(gw, max_retries=2, http_client=http) as c, pytest.raises(openai.InternalServerError) as caught:
        _speak(c)
    expect_error(caught.value, 502, "upstream_error", "bad_gateway")
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert sent == ["/v1/audio/speech"]
    assert engine.started == 1
    wait_for(lambda: bool(_access_lines(caplog)), what="the access log line")
    [line] = _access_lines(caplog)
    assert line["error"] == failure
    assert [(a["backend"], a["outcome"]) for a in line["attempts"]] == [("only", failure)]


# -- billed once ----------------------------------------------------------------------------------------------------


def test_a_request_that_failed_over_and_was_retried_is_billed_once(make_gateway: Callable[[str], Gateway],
                                                                   tmp_path: Path, engine: FakeOpenAIEngine,
                                                                   second: FakeOpenAIEngine) -> None:
    """a fails (500), b fails (404: moved on, not retried), a answers its retry: one ledger record, one
    request in gateway_requests_total, and the characters, audio seconds and cost of one request."""
    engine.mode, engine.fail_next = "500", 1
    ledger = tmp_path / "usage.jsonl"
    gw = _gateway(make_gateway, tmp_path, {"a": engine.url, "b": second.url + "/missing"},
                  "attempts: 2, backoff_s: 0.01", model_extra=PRICE,
                  extra=NO_EJECTION + f"ledger: {{sink: file, path: {ledger}}}\n")
    rid = f"test-retried-{uuid.uuid4().hex[:8]}"
    with sdk(gw) as c:
        assert len(_speak(c, extra_headers={"X-Request-ID": rid})) == PCM_BYTES
    assert [who for who, _ in _calls(engine, second)] == ["0", "1", "0"]
    seconds = PCM_BYTES / 2 / RATE
    cost = len(TEXT) / 1e6 * 15.0 + seconds / 60 * 0.6
    [record] = wait_ledger(ledger, 1)
    assert record["request_id"] == rid
    assert (record["status"], record["billable"], record["completed"], record["backend"]) == (200, True, True, "a")
    assert (record["characters"], record["audio_seconds"]) == (len(TEXT), round(seconds, 3))
    assert record["cost_usd"] == pytest.approx(cost, rel=1e-9)
    _, samples = scrape_settled(gw.url + "/metrics", 1)
    assert total(samples, "gateway_requests_total", endpoint=SPEECH) == 1
    assert total(samples, "gateway_billable_characters_total") == len(TEXT)
    assert total(samples, "gateway_billable_audio_seconds_total") == pytest.approx(seconds, abs=1e-6)
    assert total(samples, "gateway_cost_usd_total") == pytest.approx(cost, rel=1e-9)


# -- never after the first byte -----------------------------------------------------------------------------------


def test_a_stream_cut_after_its_first_byte_is_never_retried(servers: ServerThread,
                                                            make_gateway: Callable[[str], Gateway], tmp_path: Path,
                                                            engine: FakeOpenAIEngine, second: FakeOpenAIEngine,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """The first route's engine sends two chunks and drops the connection: the client has bytes, so neither
    the same route (attempts: 3) nor the second one is tried; the client's stream breaks off."""
    engine.mode, engine.chunk_size = "drop_midstream", 2048
    gw = _gateway(make_gateway, tmp_path, {"a": engine.url, "b": second.url}, "attempts: 3, backoff_s: 0.01")
    received = 0
    caplog.set_level(logging.INFO, logger="gateway.access")
    with sdk(gw) as c, pytest.raises((httpx2.RemoteProtocolError, httpx2.ReadError)):
        with c.audio.speech.with_streaming_response.create(model="tts-1", voice="nova", input=TEXT,
                                                          response_format="pcm") as response:
            assert response.status_code == 200
            for chunk in response.iter_bytes():
                received += len(chunk)
    assert 0 < received < PCM_BYTES
    assert (engine.calls(SPEECH), second.calls(SPEECH)) == (1, 0)
    wait_for(lambda: bool(_access_lines(caplog)), what="the access log line")
    [line] = _access_lines(caplog)
    assert (line["status"], line["cut_after_first_byte"]) == (200, "disconnect")
    assert [(a["backend"], a["outcome"]) for a in line["attempts"]] == [("a", "ok")]
    assert _retries(gw) == {}
    assert_settled(servers, gw, engine, second)


def test_a_transcript_cut_before_anything_was_sent_is_retried(make_gateway: Callable[[str], Gateway],
                                                              tmp_path: Path, engine: FakeOpenAIEngine) -> None:
    """The contrast: a whole-body transcript dropped half way is caught before the client gets a byte (a
    `disconnect`), so the same route is tried again, and answers."""
    engine.mode, engine.fail_next = "drop_midstream", 1
    gw = _gateway(make_gateway, tmp_path, {"only": engine.url}, "attempts: 2, backoff_s: 0.01", task="transcription")
    with sdk(gw) as c:
        assert _transcribe(c) == engine.transcript_text
    assert engine.calls(TRANSCRIBE) == 2


# -- observability ----------------------------------------------------------------------------------------------


def test_each_move_on_is_counted_and_each_attempt_logged(make_gateway: Callable[[str], Gateway], tmp_path: Path,
                                                         engine: FakeOpenAIEngine, second: FakeOpenAIEngine,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """a fails (500) once, b is busy (429, Retry-After 1, within the 2 s retry_after_max_s), a is due first
    (after its 0.01 s backoff) and answers. Two move-ons, each counted under the backend that failed and why;
    three attempts in the access log, in order, each with its duration."""
    engine.mode, engine.fail_next = "500", 1
    second.mode, second.retry_after = "429", "1"
    gw = _gateway(make_gateway, tmp_path, {"a": engine.url, "b": second.url},
                  "attempts: 2, backoff_s: 0.01, retry_after_max_s: 2")
    caplog.set_level(logging.INFO, logger="gateway.access")
    with sdk(gw) as c:
        assert len(_speak(c)) == PCM_BYTES
    assert (engine.calls(SPEECH), second.calls(SPEECH)) == (2, 1)
    scrape_settled(gw.url + "/metrics", 1)
    assert _retries(gw) == {("a", "backend_5xx"): 1, ("b", "backend_rate_limit"): 1}
    wait_for(lambda: bool(_access_lines(caplog)), what="the access log line")
    [line] = _access_lines(caplog)
    assert [(a["backend"], a["outcome"]) for a in line["attempts"]] == [
        ("a", "backend_5xx"), ("b", "backend_rate_limit"), ("a", "ok")]
    assert all(isinstance(a["ms"], float) and 0 <= a["ms"] < 60_000 for a in line["attempts"]), line
    assert (line["status"], line["backend"]) == (200, "a")


# -- parsing ------------------------------------------------------------------------------------------------------

_CONFIG = """
keys: [{{name: demo, key: k}}]
backends:
  b: {{kind: openai, url: "http://127.0.0.1:9/v1"}}
models:
  tts-1: {{task: speech, routes: [{{backend: b}}]{retry}}}
"""
PATH = "models.tts-1.retry"


def _parse_retry(body: str) -> Retry:
    return parse_config(_CONFIG.format(retry=f", retry: {body}")).models["tts-1"].retry  # type: ignore[no-any-return]


FIELDS = ("attempts", "backoff_s", "max_backoff_s", "retry_after_max_s", "budget_s")
HOSTILE = [".nan", ".NaN", ".inf", "-.inf", "-1", "-0.5", "1e400", "100000000000000000000000000000000000000",
           "'nan'", "'inf'", "'abc'", "''", "true", "false", "[1]", "{a: 1}", "'1 s'", "null"]


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize("field", FIELDS)
def test_hostile_retry_values_are_refused_at_their_path(field: str, value: str) -> None:
    """Every field refuses what is not a finite number in its range, at its own YAML path, in one short line
    (null too: a field written must say something; left out, it takes its default)."""
    with pytest.raises(ConfigError) as caught:
        _parse_retry(f"{{{field}: {value}}}")
    [problem] = caught.value.problems
    assert problem.startswith(f"{PATH}.{field}: expected "), problem
    assert len(problem) < 200 and "Traceback" not in problem


@pytest.mark.parametrize(("body", "path", "says"), [
    ("{attempts: 0}", "attempts", "expected a number >= 1, got 0"),
    ("{attempts: 11}", "attempts", "expected a number from 1 to 10, got 11"),
    ("{attempts: 1.5}", "attempts", "expected a whole number, got 1.5"),
    ("{attempts: 2, backoff_s: 0.5, max_backoff_s: 0.1}", "max_backoff_s", "expected a number >= 0.5, got 0.1"),
    ("{backoff_s: 61}", "backoff_s", "expected a number from 0 to 60, got 61"),
    ("{max_backoff_s: 601}", "max_backoff_s", "expected a number from 0.1 to 600, got 601"),
    ("{retry_after_max_s: 601}", "retry_after_max_s", "expected a number from 0 to 600, got 601"),
    ("{budget_s: 86401}", "budget_s", "expected a number from 0 to 86400, got 86401"),
    ("{attempts: 2, retries: 3}", "retries", "unknown setting (attempts, backoff_s, max_backoff_s, "
                                             "retry_after_max_s, budget_s)"),
])
def test_out_of_range_retry_settings_are_refused_at_their_path(body: str, path: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _parse_retry(body)
    assert caught.value.problems == [f"{PATH}.{path}: {says}"]


@pytest.mark.parametrize("value", ["3", "[attempts, 2]", "'attempts: 2'", "true"])
def test_a_retry_section_that_is_not_a_mapping_is_refused(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _parse_retry(value)
    [problem] = caught.value.problems
    assert problem.startswith(f"{PATH}: expected a mapping, got "), problem


def test_every_hostile_field_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        _parse_retry("{attempts: .nan, backoff_s: -1, max_backoff_s: 'x', retry_after_max_s: .inf, budget_s: true}")
    assert sorted(p.split(":")[0] for p in caught.value.problems) == sorted(f"{PATH}.{f}" for f in FIELDS)


def test_retry_settings_parse_and_default() -> None:
    assert parse_config(_CONFIG.format(retry="")).models["tts-1"].retry == Retry()  # type: ignore[attr-defined]
    assert Retry() == Retry(attempts=1, backoff_s=0.1, max_backoff_s=1.0, retry_after_max_s=2.0, budget_s=10.0)
    assert _parse_retry("{}") == Retry()
    assert _parse_retry("{attempts: 3, backoff_s: 0.05, max_backoff_s: 0.4, retry_after_max_s: 0, budget_s: 2}") \
        == Retry(3, 0.05, 0.4, 0.0, 2.0)
    parsed = _parse_retry("{attempts: '2', backoff_s: 5}")  # numbers as strings, as everywhere in the config
    assert (parsed.attempts, parsed.backoff_s, parsed.max_backoff_s) == (2, 5.0, 5.0)  # the cap rises to the base
    assert isinstance(parsed.attempts, int)
    assert _parse_retry("{attempts: 10, budget_s: 0}").attempts == 10
