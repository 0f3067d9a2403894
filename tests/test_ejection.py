"""Outlier ejection (gateway/ejection.py), over HTTP with engine doubles that record every request they get.

Ejection times here are a second (what a loaded machine needs to serve a few requests within one); a test
sleeps out what is left of one at most once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest

from gateway.adapters import ADAPTERS
from gateway.app import build_app
from gateway.config import ConfigError, load_config, parse_config
from gateway.ejection import FAILURE, SUCCESS
from gateway.settings import Outlier
from gateway.state import EJECTIONS, RELOADER
from tests.conftest import LOOPBACK_TLS, Gateway, ServerThread, sdk, serve_app
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.support import probe_backends, quick_timeouts, table_config, wait_for

pytestmark = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
SPEECH = "/v1/audio/speech"
QUICK = "outlier: {consecutive_failures: 3, base_ejection_s: 1, max_ejection_s: 4, max_ejected_percent: 50}\n"


def _gateway(make_gateway: Callable[[str], Gateway], tmp_path: Path, urls: dict[str, str],
             extra: str = QUICK) -> Gateway:
    routes = [(name, "kokoro") for name in urls]
    return make_gateway(table_config(urls, {"tts-1": ("speech", routes)}, tmp_path / "spool") + extra)


def speech(c: openai.OpenAI, **kw: Any) -> bytes:
    return c.audio.speech.create(**{"model": "tts-1", "voice": "nova", "input": "Hello there.",
                                    "response_format": "pcm", **kw}).content


def _ejected(servers: ServerThread, gw: Gateway) -> dict[str, float | None]:
    return servers.call(lambda: gw.app[EJECTIONS].ejected())


def _until_the_trial(servers: ServerThread, gw: Gateway, name: str = "first") -> None:
    """Sleep out what is left of `name`'s ejection (at most base_ejection_s, from when it began)."""
    left = _ejected(servers, gw)[name]
    assert left is not None
    time.sleep(left + 0.02)


def test_a_failing_backend_is_ejected_skipped_tried_once_and_returned(
        servers: ServerThread, make_gateway: Callable[[str], Gateway], tmp_path: Path, engine: FakeOpenAIEngine,
        second: FakeOpenAIEngine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.ejection")
    engine.mode = "500"
    gw = _gateway(make_gateway, tmp_path, {"first": engine.url, "second": second.url})
    with sdk(gw) as c:
        for _ in range(3):  # each fails over: the first route's 500, then the second answers
            assert len(speech(c)) > 100
        assert (engine.calls(SPEECH), second.calls(SPEECH)) == (3, 3)
        assert _ejected(servers, gw)["first"] is not None
        for n in range(1, 4):  # ejected: the first attempt goes to the healthy route, no failover cost
            assert len(speech(c)) > 100
            assert (engine.calls(SPEECH), second.calls(SPEECH)) == (3, 3 + n)
        metrics = httpx.get(f"{gw.url}/metrics", verify=LOOPBACK_TLS).text
        assert 'gateway_backend_ejected{backend="first"} 1.0' in metrics
        assert 'gateway_backend_ejected{backend="second"} 0.0' in metrics
        assert 'gateway_backend_ejections_total{backend="first"} 1.0' in metrics
        ready = httpx.get(f"{gw.url}/readyz", verify=LOOPBACK_TLS).json()
        assert list(ready["ejected_until"]) == ["first"]

        engine.mode = "ok"
        _until_the_trial(servers, gw)  # the ejection ends: the next request is the trial
        assert len(speech(c)) > 100
        assert (engine.calls(SPEECH), second.calls(SPEECH)) == (4, 6)
        assert _ejected(servers, gw)["first"] is None  # back in rotation
        assert len(speech(c)) > 100
        assert (engine.calls(SPEECH), second.calls(SPEECH)) == (5, 6)
    metrics = httpx.get(f"{gw.url}/metrics", verify=LOOPBACK_TLS).text
    assert 'gateway_backend_ejected{backend="first"} 0.0' in metrics
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.ejection"]
    assert messages[0].startswith("backend first: ejected for 1 s (3 consecutive failures; ejection 1)")
    assert messages[1] == "backend first: back in rotation after a successful trial"


def test_a_failed_trial_ejects_for_longer(servers: ServerThread, make_gateway: Callable[[str], Gateway],
                                          tmp_path: Path, engine: FakeOpenAIEngine, second: FakeOpenAIEngine,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gateway.ejection")
    engine.mode = "500"
    gw = _gateway(make_gateway, tmp_path, {"first": engine.url, "second": second.url})
    with sdk(gw) as c:
        for _ in range(3):
            speech(c)
        _until_the_trial(servers, gw)
        speech(c)  # the trial: the first route fails once more, the second answers
        assert (engine.calls(SPEECH), second.calls(SPEECH)) == (4, 4)
        speech(c)
        assert engine.calls(SPEECH) == 4
    assert "backend first: ejected for 2 s (its trial failed; ejection 2)" in caplog.text


def test_only_one_trial_at_a_time(servers: ServerThread, make_gateway: Callable[[str], Gateway], tmp_path: Path,
                                  engine: FakeOpenAIEngine, second: FakeOpenAIEngine) -> None:
    """The trial hangs until the backend's read timeout; meanwhile every other request goes to the second route."""
    engine.mode = "500"
    urls = {"first": engine.url, "second": second.url}
    gw = make_gateway(quick_timeouts(table_config(urls, {"tts-1": ("speech", [(n, "kokoro") for n in urls])},
                                                  tmp_path / "spool")) + QUICK)
    with sdk(gw) as c:
        for _ in range(3):
            speech(c)
        _until_the_trial(servers, gw)
        engine.mode = "hang"
        trial = threading.Thread(target=speech, args=(c,))
        trial.start()
        wait_for(lambda: engine.started == 4, what="the trial to reach the engine")
        for _ in range(3):
            speech(c)
        assert engine.started == 4 and second.calls(SPEECH) == 6
        trial.join(10)  # the trial timed out and failed over
        assert second.calls(SPEECH) == 7
        assert _ejected(servers, gw)["first"] is not None


def test_the_share_of_ejected_routes_is_capped(servers: ServerThread, make_gateway: Callable[[str], Gateway],
                                               tmp_path: Path, engine: FakeOpenAIEngine,
                                               second: FakeOpenAIEngine) -> None:
    """Envoy's 10 % of two routes is none, but at least one may go and one must stay: both failing, the
    first is skipped and the second still tried (its 502 is the client's)."""
    engine.mode = second.mode = "500"
    gw = _gateway(make_gateway, tmp_path, {"first": engine.url, "second": second.url},
                  "outlier: {consecutive_failures: 2, base_ejection_s: 5}\n")
    with sdk(gw) as c:
        for _ in range(4):
            with pytest.raises(openai.InternalServerError):
                speech(c)
        ejected = _ejected(servers, gw)
        assert ejected["first"] is not None and ejected["second"] is not None
        assert (engine.calls(SPEECH), second.calls(SPEECH)) == (2, 4)  # the second was tried, alone, by the last two


def test_a_models_only_backend_is_never_skipped(make_gateway: Callable[[str], Gateway], tmp_path: Path,
                                                servers: ServerThread, engine: FakeOpenAIEngine) -> None:
    engine.mode = "500"
    gw = _gateway(make_gateway, tmp_path, {"only": engine.url})
    with sdk(gw) as c:
        for _ in range(5):
            with pytest.raises(openai.InternalServerError):
                speech(c)
    assert engine.calls(SPEECH) == 5
    assert _ejected(servers, gw)["only"] is not None  # ejected all the same: metrics and /readyz say so


@pytest.mark.parametrize("mode", ["400", "429"])
def test_client_errors_and_a_busy_backend_never_eject(servers: ServerThread, make_gateway: Callable[[str], Gateway],
                                                      tmp_path: Path, engine: FakeOpenAIEngine,
                                                      second: FakeOpenAIEngine, mode: str) -> None:
    """The client's own 4xx says the backend works; its 429 says it is busy: failover, never ejection."""
    engine.mode = mode
    gw = _gateway(make_gateway, tmp_path, {"first": engine.url, "second": second.url})
    with sdk(gw) as c:
        for _ in range(5):
            if mode == "400":
                with pytest.raises(openai.BadRequestError):
                    speech(c)
            else:
                speech(c)  # the second route answers
    assert engine.calls(SPEECH) == 5
    assert _ejected(servers, gw) == {"first": None, "second": None}


def test_disabled_never_ejects(servers: ServerThread, make_gateway: Callable[[str], Gateway], tmp_path: Path,
                               engine: FakeOpenAIEngine, second: FakeOpenAIEngine) -> None:
    engine.mode = "500"
    gw = _gateway(make_gateway, tmp_path, {"first": engine.url, "second": second.url},
                  "outlier: {consecutive_failures: 1, enabled: false}\n")
    with sdk(gw) as c:
        for _ in range(4):
            speech(c)
    assert engine.calls(SPEECH) == 4
    assert _ejected(servers, gw)["first"] is None


def test_a_request_in_flight_when_its_backend_is_ejected_completes(
        servers: ServerThread, make_gateway: Callable[[str], Gateway], tmp_path: Path, engine: FakeOpenAIEngine,
        second: FakeOpenAIEngine) -> None:
    engine.chunk_delay, engine.chunk_size = 0.05, 8192  # about 20 chunks, 1 s
    gw = _gateway(make_gateway, tmp_path, {"first": engine.url, "second": second.url},
                  "outlier: {consecutive_failures: 3, base_ejection_s: 30}\n")
    long_input = "Long enough to stream for a while, in several chunks."
    expected = len(speech(sdk(second.url), input=long_input))
    with sdk(gw) as c:
        with c.audio.speech.with_streaming_response.create(model="tts-1", voice="nova", input=long_input,
                                                           response_format="pcm") as response:
            chunks = response.iter_bytes(2048)
            got = next(chunks)  # the first byte is out: the request is in flight on the first route
            ej = gw.app[EJECTIONS]
            backend = ej.tables.current.config.backends["first"]
            for _ in range(3):  # other requests' failures, as they would arrive
                servers.call(lambda: ej.record(backend, FAILURE))
            assert _ejected(servers, gw)["first"] is not None
            got += b"".join(chunks)
        assert len(got) == expected and engine.cancelled == 0
        assert _ejected(servers, gw)["first"] is not None  # its success was not a trial
        speech(c)
        assert (engine.calls(SPEECH), second.calls(SPEECH)) == (1, 2)


def test_failed_probes_feed_the_ejection(servers: ServerThread, make_gateway: Callable[[str], Gateway],
                                         tmp_path: Path, engine: FakeOpenAIEngine, second: FakeOpenAIEngine) -> None:
    engine.mode = "500"  # its model list too: the probe fails
    gw = _gateway(make_gateway, tmp_path, {"first": engine.url, "second": second.url},
                  "outlier: {consecutive_failures: 3, base_ejection_s: 30}\n")
    for _ in range(3):
        probe_backends(servers, gw)
    assert _ejected(servers, gw)["first"] is not None
    with sdk(gw) as c:
        speech(c)
    assert engine.calls(SPEECH) == 0 and second.calls(SPEECH) == 1
    engine.mode = "ok"
    probe_backends(servers, gw)  # a probe's success does not end it early: the requests' trial decides
    assert _ejected(servers, gw)["first"] is not None


def test_a_reload_keeps_the_state_of_unchanged_backends(servers: ServerThread, tmp_path: Path,
                                                        engine: FakeOpenAIEngine, second: FakeOpenAIEngine) -> None:
    urls = {"first": engine.url, "second": second.url}
    text = table_config(urls, {"tts-1": ("speech", [(n, "kokoro") for n in urls])}, tmp_path / "spool") \
        + "outlier: {consecutive_failures: 2, base_ejection_s: 30}\n"
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    (tmp_path / "spool").mkdir()
    config = load_config(path, kinds=ADAPTERS.keys())
    gw = servers.run(serve_app(build_app(config), config, tmp_path / "spool"))
    try:
        engine.mode = "500"
        with sdk(gw) as c:
            for _ in range(2):
                speech(c)
        assert _ejected(servers, gw)["first"] is not None
        path.write_text(text.replace("tts-1:", "tts-2: {task: speech, routes: [{backend: second}]}\n  tts-1:"))
        assert servers.run(gw.app[RELOADER].reload("test")) is True
        assert _ejected(servers, gw)["first"] is not None  # unchanged: still ejected
        path.write_text(text.replace(" timeout_s: 2", " timeout_s: 3", 1))  # first's settings change: afresh
        assert servers.run(gw.app[RELOADER].reload("test")) is True
        assert _ejected(servers, gw)["first"] is None
    finally:
        servers.run(gw.runner.cleanup())


def _ratio(percentage: str = "80", volume: int = 10, interval: float = 30, run: int = 5) -> str:
    return (f"outlier: {{consecutive_failures: {run}, base_ejection_s: 30, failure_percentage: {percentage}, "
            f"failure_percentage_request_volume: {volume}, interval_s: {interval}}}\n")


def _requests(c: openai.OpenAI, engine: FakeOpenAIEngine, outcomes: str) -> None:
    """One request per letter, the first route's engine in that mode: S answers, F fails (500), B is busy
    (429), 4 refuses the request (400, the client's error). F and B fail over to the second route."""
    for outcome in outcomes:
        engine.mode = {"S": "ok", "F": "500", "B": "429", "4": "400"}[outcome]
        if outcome == "4":
            with pytest.raises(openai.BadRequestError):
                speech(c)
        else:
            assert len(speech(c)) > 100


@pytest.mark.parametrize(("percentage", "volume", "ejected"), [
    ("80", 10, True), ("85", 10, False), ("80", 11, False), ("null", 10, False)])
def test_a_backend_failing_often_but_never_five_in_a_row_is_ejected_by_ratio(
        servers: ServerThread, make_gateway: Callable[[str], Gateway], tmp_path: Path, engine: FakeOpenAIEngine,
        second: FakeOpenAIEngine, caplog: pytest.LogCaptureFixture, percentage: str, volume: int,
        ejected: bool) -> None:
    """8 failures in 10 attempts, never more than 4 in a row: ejected at 80 % of a volume of 10, not at
    85 %, not below the volume, not with the detector off."""
    caplog.set_level(logging.INFO, logger="gateway.ejection")
    gw = _gateway(make_gateway, tmp_path, {"first": engine.url, "second": second.url}, _ratio(percentage, volume))
    with sdk(gw) as c:
        _requests(c, engine, "SFFFF" * 2)
        assert (_ejected(servers, gw)["first"] is not None) == ejected
        _requests(c, engine, "S")
    assert engine.calls(SPEECH) == (10 if ejected else 11)
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.ejection"]
    assert len(messages) == ejected
    if ejected:
        assert messages[0].startswith("backend first: ejected for 30 s (8 of 10 attempts failed within ")


def test_the_clients_4xx_counts_as_a_success_and_a_429_in_neither(
        servers: ServerThread, make_gateway: Callable[[str], Gateway], tmp_path: Path, engine: FakeOpenAIEngine,
        second: FakeOpenAIEngine, caplog: pytest.LogCaptureFixture) -> None:
    """Counted as a success the 429 would keep the ratio under 80 % (8 of 11); as a failure it would eject a
    request earlier; not counted, the eleventh request ejects at 8 of 10. Without the 4xx counted, 8
    attempts would stay under the volume."""
    caplog.set_level(logging.INFO, logger="gateway.ejection")
    gw = _gateway(make_gateway, tmp_path, {"first": engine.url, "second": second.url}, _ratio())
    with sdk(gw) as c:
        _requests(c, engine, "4FFFFB4FFF")
        assert _ejected(servers, gw)["first"] is None
        _requests(c, engine, "F")
        assert _ejected(servers, gw)["first"] is not None
    assert engine.calls(SPEECH) == 11
    assert "(8 of 10 attempts failed within " in caplog.text


@pytest.mark.parametrize(("interval", "ejected"), [(0.25, False), (30, True)])
def test_the_ratios_window_starts_afresh(servers: ServerThread, make_gateway: Callable[[str], Gateway],
                                         tmp_path: Path, engine: FakeOpenAIEngine, second: FakeOpenAIEngine,
                                         interval: float, ejected: bool) -> None:
    """Two halves of an ejecting run, a pause between them: a window shorter than the pause forgets the
    first half (however slowly the machine serves them, no window holds more than one half)."""
    gw = _gateway(make_gateway, tmp_path, {"first": engine.url, "second": second.url}, _ratio(interval=interval))
    with sdk(gw) as c:
        _requests(c, engine, "SFFFF")
        time.sleep(0.3)
        _requests(c, engine, "SFFFF")
    assert (_ejected(servers, gw)["first"] is not None) == ejected


def test_probes_count_toward_the_run_not_the_ratio(servers: ServerThread, make_gateway: Callable[[str], Gateway],
                                                   tmp_path: Path, engine: FakeOpenAIEngine,
                                                   second: FakeOpenAIEngine, caplog: pytest.LogCaptureFixture
                                                   ) -> None:
    """Ten failed probes are no attempts: nine failed requests after them are still under the volume."""
    caplog.set_level(logging.INFO, logger="gateway.ejection")
    gw = _gateway(make_gateway, tmp_path, {"first": engine.url, "second": second.url}, _ratio(run=100))
    engine.mode = "500"  # its model list too: the probe fails
    for _ in range(10):
        probe_backends(servers, gw)
    assert _ejected(servers, gw)["first"] is None
    with sdk(gw) as c:
        _requests(c, engine, "F" * 9)
        assert _ejected(servers, gw)["first"] is None
        _requests(c, engine, "F")
    assert _ejected(servers, gw)["first"] is not None
    assert "(10 of 10 attempts failed within " in caplog.text


def test_a_backend_back_from_a_ratio_ejection_is_judged_on_new_attempts(
        servers: ServerThread, make_gateway: Callable[[str], Gateway], tmp_path: Path, engine: FakeOpenAIEngine,
        second: FakeOpenAIEngine) -> None:
    """Outcomes fed as first_success would, on a clock of the test's: the failures sent to it while ejected
    and before its ejection do not count once its trial brought it back, although its window (100 s) is not
    over; ten new attempts are needed."""
    gw = _gateway(make_gateway, tmp_path, {"first": engine.url, "second": second.url},
                  _ratio(run=100, interval=100))
    ej = gw.app[EJECTIONS]
    backend = ej.tables.current.config.backends["first"]

    def feed(outcome: str, at: float, n: int = 1, trial: bool = False) -> None:
        for _ in range(n):
            servers.call(lambda: ej.record(backend, outcome, trial, now=at))

    feed(SUCCESS, 1000.0, 2)
    feed(FAILURE, 1000.0, 8)
    assert servers.call(lambda: ej.ejected(now=1000.0))["first"] == 30
    feed(FAILURE, 1010.0, 5)  # requests already sent to it, answering while it is ejected
    assert servers.call(lambda: ej.begin(backend, now=1031.0)) is True
    feed(SUCCESS, 1031.0, trial=True)
    feed(FAILURE, 1032.0, 9)
    assert servers.call(lambda: ej.ejected(now=1032.0))["first"] is None
    feed(FAILURE, 1032.0)
    assert servers.call(lambda: ej.ejected(now=1032.0))["first"] == 60


# -- config ------------------------------------------------------------------------------------------------

BASE = """
keys: [{name: a, key: k}]
backends:
  one: {kind: openai, url: "http://127.0.0.1:1/v1"%s}
  two: {kind: openai, url: "http://127.0.0.1:2/v1"}
models:
  m: {task: speech, routes: [{backend: one}, {backend: two}]}
"""


def test_defaults_are_envoys_and_a_backend_overrides_them() -> None:
    assert Outlier() == Outlier(True, 5, 30.0, 300.0, 10.0, 85.0, 50, 10.0)
    config = parse_config(BASE % ", outlier: {consecutive_failures: 2}" + "outlier: {base_ejection_s: 1}\n")
    assert config.outlier["one"] == Outlier(True, 2, 1.0, 300.0, 10.0, 85.0, 50, 10.0)
    assert config.outlier["two"] == Outlier(True, 5, 1.0, 300.0, 10.0, 85.0, 50, 10.0)
    assert "outlier" not in config.backends["one"].options


def test_null_turns_the_ratio_off_everywhere_or_for_one_backend() -> None:
    config = parse_config(BASE % ", outlier: {failure_percentage: null}")
    assert (config.outlier["one"].failure_percentage, config.outlier["two"].failure_percentage) == (None, 85.0)
    config = parse_config(BASE % ", outlier: {failure_percentage: 90}" + "outlier: {failure_percentage: null}\n")
    assert (config.outlier["one"].failure_percentage, config.outlier["two"].failure_percentage) == (90.0, None)


@pytest.mark.parametrize(("section", "problem"), [
    ("outlier: {consecutive_failures: .nan}", "outlier.consecutive_failures: expected a number >= 1"),
    ("outlier: {consecutive_failures: 0}", "outlier.consecutive_failures: expected a number >= 1"),
    ("outlier: {consecutive_failures: 1e12}", "outlier.consecutive_failures: expected a number from 1 to 1000000"),
    ("outlier: {consecutive_failures: true}", "outlier.consecutive_failures: expected a number >= 1"),
    ("outlier: {base_ejection_s: .inf}", "outlier.base_ejection_s: expected a number >= 0.001"),
    ("outlier: {base_ejection_s: -1}", "outlier.base_ejection_s: expected a number >= 0.001"),
    ("outlier: {max_ejection_s: 1e300}", "outlier.max_ejection_s: expected a number from 0.001 to 86400"),
    ("outlier: {base_ejection_s: 60, max_ejection_s: 10}", "outlier.max_ejection_s: expected a number >= "
                                                           "base_ejection_s"),
    ("outlier: {max_ejected_percent: 101}", "outlier.max_ejected_percent: expected a number from 0 to 100"),
    ("outlier: {max_ejected_percent: -5}", "outlier.max_ejected_percent: expected a number >= 0"),
    ("outlier: {max_ejected_percent: [10]}", "outlier.max_ejected_percent: expected a number >= 0"),
    ("outlier: {enabled: 'no'}", "outlier.enabled: expected true or false"),
    ("outlier: {failure_percentage: .nan}", "outlier.failure_percentage: expected a number >= 0"),
    ("outlier: {failure_percentage: .inf}", "outlier.failure_percentage: expected a number >= 0"),
    ("outlier: {failure_percentage: -1}", "outlier.failure_percentage: expected a number >= 0"),
    ("outlier: {failure_percentage: 0}", "outlier.failure_percentage: expected a number > 0 and <= 100 (null: off)"),
    ("outlier: {failure_percentage: 100.5}", "outlier.failure_percentage: expected a number > 0 and <= 100"),
    ("outlier: {failure_percentage: 'most'}", "outlier.failure_percentage: expected a number >= 0"),
    ("outlier: {failure_percentage: [85]}", "outlier.failure_percentage: expected a number >= 0"),
    ("outlier: {failure_percentage: false}", "outlier.failure_percentage: expected a number >= 0"),
    ("outlier: {failure_percentage_request_volume: 0}",
     "outlier.failure_percentage_request_volume: expected a number >= 1"),
    ("outlier: {failure_percentage_request_volume: 1e12}",
     "outlier.failure_percentage_request_volume: expected a number from 1 to 1000000"),
    ("outlier: {failure_percentage_request_volume: .inf}",
     "outlier.failure_percentage_request_volume: expected a number >= 1"),
    ("outlier: {failure_percentage_request_volume: null}",
     "outlier.failure_percentage_request_volume: expected a number >= 1"),
    ("outlier: {interval_s: 0}", "outlier.interval_s: expected a number >= 0.001"),
    ("outlier: {interval_s: -10}", "outlier.interval_s: expected a number >= 0.001"),
    ("outlier: {interval_s: .nan}", "outlier.interval_s: expected a number >= 0.001"),
    ("outlier: {interval_s: 1e300}", "outlier.interval_s: expected a number from 0.001 to 86400"),
    ("outlier: {interval_s: {s: 10}}", "outlier.interval_s: expected a number >= 0.001"),
    ("outlier: {consecutive: 5}", "outlier.consecutive: unknown setting"),
    ("outlier: [5]", "outlier: expected a mapping"),
    ("outlier: 5", "outlier: expected a mapping"),
])
def test_hostile_values_are_refused_by_path(section: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE % "" + section + "\n")
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


@pytest.mark.parametrize(("override", "problem"), [
    ("{base_ejection_s: .nan}", "backends.one.outlier.base_ejection_s: expected a number >= 0.001"),
    ("{max_ejection_s: 'soon'}", "backends.one.outlier.max_ejection_s: expected a number >= 0.001"),
    ("7", "backends.one.outlier: expected a mapping"),
    ("{failure_percentage: 850}", "backends.one.outlier.failure_percentage: expected a number > 0 and <= 100"),
    ("{failure_percentage_request_volume: 2e9}",
     "backends.one.outlier.failure_percentage_request_volume: expected a number from 1 to 1000000"),
    ("{interval_s: -.inf}", "backends.one.outlier.interval_s: expected a number >= 0.001"),
])
def test_hostile_overrides_are_refused_by_path(override: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE % f", outlier: {override}")
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems
